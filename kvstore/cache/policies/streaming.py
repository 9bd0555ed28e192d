"""StreamingLLM (Xiao et al.): attention sinks plus the most recent tokens, nothing else.

The cheapest policy and the MagicDec drafter's: it never looks at keys or queries, so its choice
is simply the most recent m middle positions, which joined with the window gives one contiguous
window of budget - sink tokens.
"""

from __future__ import annotations

import torch

from kvstore.cache.policies.base import Policy, SelectionContext


class StreamingPolicy(Policy):
    name = "streaming"
    needs_queries = False

    def choose(self, ctx: SelectionContext) -> torch.Tensor:
        recent = torch.arange(ctx.hi - 1, ctx.hi - ctx.m - 1, -1, device=ctx.keys.device)  # [m], newest first
        return recent.expand(ctx.num_kv_heads, ctx.m).contiguous()             # [Hkv, m]
