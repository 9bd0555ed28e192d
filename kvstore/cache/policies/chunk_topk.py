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

import math

import torch

from kvstore.cache.policies.base import Policy, SelectionContext, top_chunks


class ChunkTopKPolicy(Policy):
    name = "chunk_topk"

    def choose(self, ctx: SelectionContext) -> torch.Tensor:
        scores, _ = self._chunk_scores(ctx)
        return top_chunks(scores, ctx.hi - ctx.lo, ctx.chunk, ctx.m) + ctx.lo

    def shares(self, ctx: SelectionContext) -> torch.Tensor:
        """Every key of a chunk taken to score as the chunk's mean key against the proxy: the
        softmax of scores / sqrt(D) over the middle's positions."""
        scores, sizes = self._chunk_scores(ctx)                                  # [Hkv, nc], [nc]
        logits = scores / math.sqrt(ctx.keys.shape[-1])
        weights = (logits + sizes.log()).softmax(dim=1) / sizes                  # per position of each chunk
        return weights.repeat_interleave(ctx.chunk, dim=1)[:, :ctx.hi - ctx.lo]  # [Hkv, span]

    @staticmethod
    def _chunk_scores(ctx: SelectionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [Hkv, nc], chunk sizes [nc]) of the middle's chunks."""
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
        return torch.einsum("hcd,hd->hc", mean_keys, proxy), sizes              # [Hkv, nc]
