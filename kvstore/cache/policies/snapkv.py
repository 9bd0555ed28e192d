"""SnapKV (Li et al.): keep the positions the recent queries attend to most.

The observation window (the last obs_window queries of the layer) attends over every cached key;
the softmax weights are summed over the window and pooled over the GQA group, so each KV head
keeps what any of its query heads reads. A 1-D max-pool (kernel 7) spreads a peak to its
neighbours so the kept entries come with their local context.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvstore.cache.policies.base import Policy, SelectionContext

KERNEL = 7


class SnapKVPolicy(Policy):
    name = "snapkv"

    def choose(self, ctx: SelectionContext) -> torch.Tensor:
        return self._pooled(ctx)[0].topk(ctx.m, dim=1).indices + ctx.lo         # [Hkv, m]

    def shares(self, ctx: SelectionContext) -> torch.Tensor:
        """The max-pooled window weights over the window's total weight on the middle: each
        position scores its strongest neighbour's share (so the sum exceeds 1 where peaks spread)."""
        pooled, total = self._pooled(ctx)
        return pooled / total.clamp_min(1e-30)

    @staticmethod
    def _pooled(ctx: SelectionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """([Hkv, span] the window's attention weights on the middle, max-pooled; [Hkv, 1] their
        sum before pooling)."""
        keys = ctx.keys.float()                                                 # [Hkv, n, D]
        hkv, n, d = keys.shape
        q = ctx.grouped_queries()                                               # [Hkv, G, w, D]
        if q is None:                                                           # nothing observed yet
            q = ctx.query_proxy().view(hkv, 1, 1, d)
            qpos = torch.full((1,), n - 1, dtype=torch.int64)
        else:
            qpos = ctx.query_positions
        q = q.to(keys.device)
        logits = torch.einsum("hgwd,hnd->hgwn", q, keys) / math.sqrt(d)         # [Hkv, G, w, n]
        # A query only saw the keys up to its own position.
        visible = torch.arange(n, device=keys.device).view(1, -1) <= qpos.to(keys.device).view(-1, 1)  # [w, n]
        logits = logits.masked_fill(~visible, float("-inf"))
        weight = logits.softmax(dim=-1).sum(dim=(1, 2))                         # [Hkv, n]
        mid = weight[:, ctx.lo:ctx.hi]                                          # [Hkv, span]
        pooled = F.max_pool1d(mid.unsqueeze(1), KERNEL, stride=1, padding=KERNEL // 2).squeeze(1)
        return pooled, mid.sum(dim=1, keepdim=True)
