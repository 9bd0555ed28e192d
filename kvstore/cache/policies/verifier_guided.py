"""verifier_guided: keep what the verifier's full attention says matters (its KV summary).

The verifier scores every context position by the attention mass its queries put there and sends
the top chunks (kvstore/cache/summary.py). This policy gives those chunks, best first, a share of the
middle slots (`SparseConfig.guided_share`, the same positions in every layer and KV head: the
summary is pooled); its own policy (`SparseConfig.fallback`, chunk_topk by default) fills the
rest per layer and head, from what the drafter's own queries read. The summary adds what the
full attention sees to what the sparse one sees instead of replacing it. Before the first summary
arrives the fallback chooses alone.
"""

from __future__ import annotations

import math

import torch

from kvstore.cache.policies.base import Policy, SelectionContext
from kvstore.cache.policies.registry import get_policy


class VerifierGuidedPolicy(Policy):
    name = "verifier_guided"
    uses_summary = True

    def __init__(self, config=None):
        super().__init__(config)
        self.share = getattr(config, "guided_share", 1.0)
        self.fallback: Policy = get_policy(getattr(config, "fallback", "chunk_topk"))(config)
        self.needs_queries = self.fallback.needs_queries

    def summary_slots(self, m: int) -> int:
        """Middle slots the summary may fill, of m."""
        return min(m, math.ceil(self.share * m))

    def choose(self, ctx: SelectionContext) -> torch.Tensor:
        own = self.fallback.choose(ctx)                                          # [Hkv, m], best first
        if ctx.summary is None:
            return own
        guided = ctx.summary.ranked_positions(ctx.lo, ctx.hi)[:self.summary_slots(ctx.m)]
        if not guided:
            return own
        g = torch.tensor(guided, dtype=torch.int64, device=own.device)           # [s]
        need = ctx.m - len(guided)
        rows = []
        for head in own:                                                         # Hkv rows of [m]
            rest = head[~torch.isin(head, g)][:need]                             # >= need remain
            rows.append(torch.cat([g, rest]))
        return torch.stack(rows)                                                 # [Hkv, m]
