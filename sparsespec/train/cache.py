"""A differentiable KV cache for the student's continuation.

Inference caches write into preallocated buffers in place, which autograd cannot follow. Training
needs something simpler: a fixed, gradient-free prefix (the student's own K/V, computed once
under no_grad, all of it or the entries a policy kept) and one forward over the continuation
that attends [prefix ; continuation causally] with gradient. It speaks the same KVCache contract,
so the model code is exactly the one inference runs.
"""

from __future__ import annotations

import torch

from kvstore.cache.base import KVCache
from sparsespec.kernels.attention import attend, causal_block_mask


class PrefixKV:
    """One view of the prefix: per layer K/V [1, Hkv, S, D] (no grad). Every KV head keeps the
    same number S of entries (a budget), though not necessarily the same positions."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], prefix_len: int):
        if len(keys) != len(values) or not keys:
            raise ValueError("keys and values need one tensor per layer")
        self.keys, self.values = keys, values          # [1, Hkv, S, D] each
        self.prefix_len = prefix_len                   # positions the prefix spans (P)

    @property
    def entries(self) -> int:
        return self.keys[0].shape[2]


class ContinuationCache(KVCache):
    """Attends one continuation forward over a fixed PrefixKV. Single use: one forward."""

    def __init__(self, prefix: PrefixKV):
        self.prefix = prefix
        self._t = 0
        self._mask: torch.Tensor | None = None

    def begin_forward(self, num_new: int) -> torch.Tensor:
        if self._t:
            raise RuntimeError("a ContinuationCache serves exactly one forward")
        s = self.prefix.entries
        device = self.prefix.keys[0].device
        self._t = num_new
        self._mask = causal_block_mask(torch.tensor([s], device=device), num_new, s + num_new)  # [1, 1, T, S+T]
        p = self.prefix.prefix_len
        return torch.arange(p, p + num_new, device=device).view(1, -1)          # [1, T]

    def attend(self, layer, q, k, v):
        """q: [1, H, T, D], k/v: [1, Hkv, T, D] (with grad) -> [1, H, T, D]."""
        keys = torch.cat([self.prefix.keys[layer], k], dim=2)                  # [1, Hkv, S+T, D]
        values = torch.cat([self.prefix.values[layer], v], dim=2)
        return attend(q, keys, values, self._mask)

    def end_forward(self) -> None:
        pass

    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.prefix.keys + self.prefix.values)
