"""The student's prefix, computed once without gradient, seen through several KV views.

The full view is every prefix entry. A sparse view is exactly what the drafter would keep at
inference after prefilling the same prefix: the prefix is fed through a real SparseKVCache (the
same policy code, sinks/window arithmetic and query recording as kvstore/cache/sparse.py), whose
first selection is then read back per layer. One student forward serves every view: a tee cache
hands each layer's q/k/v to every cache; only the full cache's attention output is used (a
sparse cache attends exactly over its host tier before its first selection, so all agree).
"""

from __future__ import annotations

import torch

from kvstore.cache.base import KVCache
from kvstore.cache.full import FullKVCache
from kvstore.cache.sparse import SparseConfig, SparseKVCache
from sparsespec.train.cache import PrefixKV


class TeeCache(KVCache):
    """The primary cache computes attention; followers only record the same forward."""

    def __init__(self, primary: KVCache, followers: list[KVCache]):
        self.primary, self.followers = primary, followers

    def begin_forward(self, num_new: int) -> torch.Tensor:
        for f in self.followers:
            f.begin_forward(num_new)
        return self.primary.begin_forward(num_new)

    def attend(self, layer, q, k, v):
        for f in self.followers:
            f.attend(layer, q, k, v)           # output discarded: identical before selection
        return self.primary.attend(layer, q, k, v)

    def end_forward(self) -> None:
        for f in self.followers:
            f.end_forward()
        self.primary.end_forward()

    def device_bytes(self) -> int:
        return self.primary.device_bytes()


def sparse_config(policy: str, budget: int) -> SparseConfig:
    """The drafter's inference config for a budget (defaults for sink, window, chunk, ...)."""
    return SparseConfig(policy=policy, budget=budget)


@torch.no_grad()
def prefix_views(model, prefix_ids: torch.Tensor, budgets: list[int | None],
                 policy: str) -> dict[int | None, PrefixKV]:
    """prefix_ids: [1, P]. Returns {budget: PrefixKV}; budget None is the full view.

    A budget >= P keeps everything (as the cache does), so it is the full view too.
    """
    p = prefix_ids.shape[1]
    full = FullKVCache.for_model(model, p, rings=False)    # read by position below
    sparse = {b: SparseKVCache.for_model(model, p, sparse_config(policy, b))
              for b in dict.fromkeys(budgets) if b is not None and b < p}
    model(prefix_ids, TeeCache(full, list(sparse.values())), last_only=True)
    out: dict[int | None, PrefixKV] = {}
    full_view = PrefixKV([k[:, :, :p] for k in full.k], [v[:, :, :p] for v in full.v], p)
    for b in budgets:
        if b not in sparse:
            out[b] = full_view
            continue
        cache = sparse[b]
        cache.upkeep()                                                  # the first selection
        ks, vs = [], []
        for layer in range(model.cfg.num_layers):
            k, v, _ = cache.device_view(layer)                         # [Hkv, B, D]
            ks.append(k.unsqueeze(0).clone())
            vs.append(v.unsqueeze(0).clone())
        out[b] = PrefixKV(ks, vs, p)
    return out
