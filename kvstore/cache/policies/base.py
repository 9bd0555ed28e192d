"""What a KV policy is: given one layer's host-tier keys and the recent queries, choose which
middle positions the drafter keeps on its device.

The cache owns the budget arithmetic. Sinks [0, sink) and the recent window [n - window, n) are
always kept; a policy only fills the remaining m = budget - sink - window slots from the middle
range [lo, hi) = [sink, n - window), independently for each KV head. Keeping the policy this
narrow is what lets a new policy be one small file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class SelectionContext:
    """Everything a policy may look at when it chooses for one layer."""

    layer: int
    length: int                          # n: entries [0, n) exist
    keys: torch.Tensor                   # [Hkv, n, D] host-tier view, rotated at original positions
    queries: torch.Tensor | None         # [H, w, D] the most recent w <= obs_window queries (positions < n), or None
    query_positions: torch.Tensor | None  # [w] int64, their positions (increasing)
    group_size: int                      # G = H // Hkv; query head h reads KV head h // G
    chunk: int                           # selection unit of chunked policies
    lo: int                              # middle range start (= sink)
    hi: int                              # middle range end (= n - window), exclusive
    m: int                               # positions to choose per KV head, 0 < m <= hi - lo
    summary: Any = None                  # kvstore.cache.summary.Summary: the verifier's latest, if any

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[0]

    def grouped_queries(self) -> torch.Tensor | None:
        """[Hkv, G, w, D] float32: the recent queries arranged by the KV head they read."""
        if self.queries is None or self.queries.shape[1] == 0:
            return None
        h, w, d = self.queries.shape
        return self.queries.float().view(self.num_kv_heads, h // self.num_kv_heads, w, d)

    def query_proxy(self) -> torch.Tensor:
        """[Hkv, D] float32: what the next queries of each KV group are expected to look like.

        The mean of the recent queries of the heads in the group; without recorded queries, the
        last cached key (the proxy the paper's TriForce-style retrieval uses).
        """
        q = self.grouped_queries()
        if q is None:
            return self.keys[:, self.length - 1].float()
        return q.mean(dim=(1, 2))


class Policy(ABC):
    """Chooses middle positions per KV head. Stateless across calls unless a subclass says why."""

    name: ClassVar[str]
    needs_queries: ClassVar[bool] = True   # False: the cache does not record queries (saves work)
    keeps_all: ClassVar[bool] = False      # True: no budget, the cache keeps every entry on device
    uses_summary: ClassVar[bool] = False   # True: the drafter asks the verifier for KV summaries

    def __init__(self, config=None):
        self.config = config

    @abstractmethod
    def choose(self, ctx: SelectionContext) -> torch.Tensor:
        """Returns int64 [Hkv, ctx.m]: distinct positions in [ctx.lo, ctx.hi) per KV head, best
        first (the cache sorts them; verifier_guided fills its free slots in this order)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
