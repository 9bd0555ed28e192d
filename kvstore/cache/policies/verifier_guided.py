"""verifier_guided: the drafter's own policy, plus what the verifier's full attention says matters.

The verifier scores every context position per (layer group, KV head) by the share of the
attention mass its queries put there and sends the top chunks (kvstore/cache/summary.py; the
drafter binds it to its own layers and heads, `Summary.for_drafter`). Its own policy
(`SparseConfig.fallback`, chunk_topk by default) estimates the same quantity from the drafter's
keys and queries (`Policy.shares`). Per layer and KV head, each middle position scores the larger
of the two and the best m are kept. So the summary only adds: a position the own policy keeps is
displaced only by one the summary scores higher than the own policy scored it; with nothing
useful in the summary the own policy's choice stands. Before the first summary the fallback
chooses alone.
"""

from __future__ import annotations

import torch

from kvstore.cache.policies.base import Policy, SelectionContext
from kvstore.cache.policies.registry import get_policy


class VerifierGuidedPolicy(Policy):
    name = "verifier_guided"
    uses_summary = True

    def __init__(self, config=None):
        super().__init__(config)
        # SparseConfig checks that the fallback estimates shares and reads no summary.
        self.fallback: Policy = get_policy(getattr(config, "fallback", "chunk_topk"))(config)
        self.needs_queries = self.fallback.needs_queries

    def choose(self, ctx: SelectionContext) -> torch.Tensor:
        advice = None if ctx.summary is None else ctx.summary.shares(ctx.layer, ctx.lo, ctx.hi, ctx.num_kv_heads)
        if advice is None:
            return self.fallback.choose(ctx)
        own = self.fallback.shares(ctx)                                          # [Hkv, span]
        merged = torch.maximum(own, advice.to(own.device))
        return merged.argsort(dim=1, descending=True, stable=True)[:, :ctx.m] + ctx.lo   # [Hkv, m]
