"""The full cache as a drafter policy: no budget, every entry stays on the device.

The baseline that isolates the cost of sparsity (acceptance with the drafter's full view). The
cache sees keeps_all and runs as a plain full cache with no host tier; choose() is only reached
if someone calls it directly, and then keeps the whole middle.
"""

from __future__ import annotations

import torch

from kvstore.cache.policies.base import Policy, SelectionContext


class FullPolicy(Policy):
    name = "full"
    needs_queries = False
    keeps_all = True

    def choose(self, ctx: SelectionContext) -> torch.Tensor:
        if ctx.m != ctx.hi - ctx.lo:
            raise ValueError(f"policy 'full' keeps every entry; asked for {ctx.m} of {ctx.hi - ctx.lo}")
        return torch.arange(ctx.lo, ctx.hi, device=ctx.keys.device).expand(ctx.num_kv_heads, ctx.m).contiguous()
