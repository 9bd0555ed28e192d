"""StackedKVCache: single-session caches as the rows of one batch, for one forward.

The drafter batches its sessions so that one forward per draft position reads the weights once
for all of them (on a CPU or a small GPU a decode step is bound by reading weights). Every
session keeps its own SparseKVCache (its budget, policy and host tier); this adapter only lines
them up: positions and outputs are stacked, and each row attends over its own cache. Fixed
budgets keep the rows' views about the same size, so nothing is paged or padded.
"""

from __future__ import annotations

import torch

from kvstore.cache.base import KVCache
from kvstore.cache.sparse import SparseKVCache
from sparsespec.kernels.attention import attend_rows, use_triton


class StackedKVCache(KVCache):
    def __init__(self, caches: list[KVCache]):
        if not caches:
            raise ValueError("a stacked forward needs at least one cache")
        self.caches = caches

    def begin_forward(self, num_new: int) -> torch.Tensor:
        return torch.cat([c.begin_forward(num_new) for c in self.caches])            # [S, T]

    def attend(self, layer, q, k, v):
        """q: [S, H, T, D], k/v: [S, Hkv, T, D] -> [S, H, T, D]; row i attends over cache i.

        A decode step of sparse caches (the drafter's chain drafting) on the Triton backend is one
        batched kernel over every row's device view (`attend_rows`), not S launches."""
        if q.shape[2] == 1 and use_triton(q.device) and all(
                isinstance(c, SparseKVCache) and c.decodes_from_view() for c in self.caches):
            views = [c.append(layer, q[i:i + 1], k[i:i + 1], v[i:i + 1]) for i, c in enumerate(self.caches)]
            return attend_rows(q, [kv[0] for kv in views], [kv[1] for kv in views])
        return torch.cat([c.attend(layer, q[i:i + 1], k[i:i + 1], v[i:i + 1])
                          for i, c in enumerate(self.caches)])

    def end_forward(self) -> None:
        for c in self.caches:
            c.end_forward()

    def device_bytes(self) -> int:
        return sum(c.device_bytes() for c in self.caches)

    def host_bytes(self) -> int:
        return sum(c.host_bytes() for c in self.caches)
