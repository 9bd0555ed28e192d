"""fed: the verifier chooses, from its own exact K/V and queries, and sends the drafter the result.

For a drafter whose K/V are the verifier's (the same model, or a `layers:N` cut of it), the
verifier already holds every committed entry exactly and sees the real queries of every layer.
So this policy runs on the verifier (sparsespec/spec/feed.py): each layer's last queries attend
over all its keys, the attention mass is summed over the window and the GQA group (what any
query head of a KV head reads) and pooled per chunk, and the best chunks are kept whole. The
drafter's cache holds what it is fed (kvstore/cache/feed.py): no host tier, no prefill, and no
entry it computed itself beyond the current round's pending token and drafts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvstore.cache.policies.base import Policy, SelectionContext, top_chunks


class FedPolicy(Policy):
    name = "fed"
    fed = True
    needs_queries = False   # the drafter records none: the verifier's recorder has the real ones

    def choose(self, ctx: SelectionContext) -> torch.Tensor:
        keys = ctx.keys.float()                                                 # [Hkv, n, D]
        hkv, n, d = keys.shape
        q = ctx.grouped_queries()                                               # [Hkv, G, w, D]
        if q is None:
            q = ctx.query_proxy().view(hkv, 1, 1, d)
            qpos = torch.full((1,), n - 1, dtype=torch.int64)
        else:
            qpos = ctx.query_positions
        g, w = q.shape[1], q.shape[2]
        logits = torch.einsum("hqd,hnd->hqn", q.to(keys.device).reshape(hkv, g * w, d), keys)   # [Hkv, G*w, n]
        logits.mul_(1.0 / math.sqrt(d))
        first = int(qpos[0])                  # a query sees the keys up to its own position: only
        if first + 1 < n:                     # the columns after the first query can be hidden
            cols = torch.arange(first + 1, n, device=keys.device)                # [n - first - 1]
            hidden = cols.view(1, -1) > qpos.to(keys.device).view(-1, 1)          # [w, n - first - 1]
            logits.view(hkv, g, w, n)[..., first + 1:].masked_fill_(hidden, float("-inf"))
        mass = logits.softmax(dim=-1).view(hkv, g * w, n).sum(dim=1)            # [Hkv, n]
        span, c = ctx.hi - ctx.lo, ctx.chunk
        per_chunk = F.pad(mass[:, ctx.lo:ctx.hi], (0, -span % c)).view(hkv, -1, c).sum(-1)  # [Hkv, chunks]
        return top_chunks(per_chunk, span, c, ctx.m) + ctx.lo                   # [Hkv, m]
