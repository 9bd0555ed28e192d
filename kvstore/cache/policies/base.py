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
from typing import Any, Callable, ClassVar

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
    fed: ClassVar[bool] = False            # True: the verifier runs it over its own exact K/V and
                                           # queries and feeds the drafter the result (kvstore/cache/feed.py)

    def __init__(self, config=None):
        self.config = config

    @abstractmethod
    def choose(self, ctx: SelectionContext) -> torch.Tensor:
        """Returns int64 [Hkv, ctx.m]: distinct positions in [ctx.lo, ctx.hi) per KV head, best
        first (the cache sorts them)."""

    def shares(self, ctx: SelectionContext) -> torch.Tensor | None:
        """float32 [Hkv, ctx.hi - ctx.lo]: this policy's estimate of each middle position's share
        of the layer's attention mass on the middle per KV head (about 1 in total), ranking the
        positions as `choose` does. The scale verifier_guided compares with the verifier's
        summary; None (the default): the policy has no estimate and cannot be its fallback."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def estimates_shares(cls: type[Policy]) -> bool:
    """Whether the policy class implements `shares` (what verifier_guided's fallback needs)."""
    return cls.shares is not Policy.shares


def top_chunks(scores: torch.Tensor, span: int, chunk: int, m: int) -> torch.Tensor:
    """The first m offsets of [0, span) when chunks (of `chunk` offsets, the last possibly short)
    are taken whole in descending score order: int64 [Hkv, m]. scores: [Hkv, ceil(span / chunk)]."""
    hkv, nc = scores.shape
    order = scores.argsort(dim=1, descending=True, stable=True)             # [Hkv, nc]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(nc, device=scores.device).expand(hkv, nc))
    offsets = torch.arange(span, device=scores.device)                     # [span]
    key = rank[:, offsets // chunk] * chunk + offsets % chunk               # [Hkv, span]
    return key.argsort(dim=1)[:, :m]                                        # [Hkv, m]


def choose_view(policy: Policy, n: int, budget: int, sink: int, window: int, num_kv_heads: int,
                context: Callable[[int, int, int], SelectionContext], device: torch.device | str) -> torch.Tensor:
    """The positions one layer keeps over [0, n) under `budget`: sinks, the policy's middle
    choice, the recent window. int64 [Hkv, min(n, budget)], increasing per head.

    `context(lo, hi, m)` builds the policy's view of the layer; it is only called when there is a
    middle to choose. `device` is where the positions live (the policy's choice is moved there):
    no default, since a policy scoring CUDA keys would otherwise mix devices with CPU sinks. The
    drafter's SparseKVCache and the verifier's feeder both select here.
    """
    if n <= budget:
        return torch.arange(n, device=device).expand(num_kv_heads, n)       # keep everything
    lo, hi = sink, n - window
    m = budget - sink - window
    parts = [torch.arange(lo, device=device).expand(num_kv_heads, lo)]
    if m > 0:
        mid = policy.choose(context(lo, hi, m)).to(device)
        _check_choice(policy, mid, num_kv_heads, lo, hi, m)
        parts.append(mid.sort(dim=1).values)
    parts.append(torch.arange(hi, n, device=device).expand(num_kv_heads, n - hi))
    return torch.cat(parts, dim=1)                                          # [Hkv, budget]


def _check_choice(policy: Policy, mid: torch.Tensor, num_kv_heads: int, lo: int, hi: int, m: int) -> None:
    name = policy.name
    if tuple(mid.shape) != (num_kv_heads, m) or mid.dtype != torch.int64:
        raise RuntimeError(f"policy {name!r} returned {tuple(mid.shape)} {mid.dtype}, "
                           f"expected ({num_kv_heads}, {m}) int64")
    if m and (int(mid.min()) < lo or int(mid.max()) >= hi):
        raise RuntimeError(f"policy {name!r} chose positions outside the middle range [{lo}, {hi})")
    if m > 1 and not bool((mid.sort(dim=1).values.diff(dim=1) > 0).all()):
        raise RuntimeError(f"policy {name!r} chose a position twice")
