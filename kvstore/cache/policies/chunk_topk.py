"""TriForce-style chunk retrieval, the seed paper's drafter policy.

The middle range is cut into chunks of `chunk` consecutive positions (aligned to its start, the
last one possibly shorter). Each chunk is scored per KV head by (mean key of the chunk) . (query
proxy), and the best chunks are kept whole until m positions are taken (the last chunk taken is
cut short when m is not a multiple of the chunk). Whole chunks keep local context together,
which a per-token top-k scatters.

Unlike the paper (one selection after prefill), the cache calls this again every
reselect_interval appended tokens, so the selection follows the generation.
"""

from __future__ import annotations

import torch

from kvstore.cache.policies.base import Policy, SelectionContext, top_chunks


class ChunkTopKPolicy(Policy):
    name = "chunk_topk"

    def choose(self, ctx: SelectionContext) -> torch.Tensor:
        c = ctx.chunk
        hkv, _, d = ctx.keys.shape
        span = ctx.hi - ctx.lo
        nc = -(-span // c)                                                      # chunks, last may be short
        mid = ctx.keys[:, ctx.lo:ctx.hi].float()                                # [Hkv, span, D]
        pad = nc * c - span
        if pad:
            mid = torch.cat([mid, mid.new_zeros(hkv, pad, d)], dim=1)
        sizes = torch.full((nc,), c, dtype=torch.float32, device=mid.device)
        sizes[-1] = c - pad
        mean_keys = mid.view(hkv, nc, c, d).sum(2) / sizes.view(1, nc, 1)       # [Hkv, nc, D]
        proxy = ctx.query_proxy().to(mid.device)                                # [Hkv, D]
        scores = torch.einsum("hcd,hd->hc", mean_keys, proxy)                   # [Hkv, nc]
        return top_chunks(scores, span, c, ctx.m) + ctx.lo
