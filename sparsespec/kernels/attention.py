"""Attention over gathered cache entries: the torch reference every cache uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_block_mask(num_past: torch.Tensor, num_new: int, num_keys: int) -> torch.Tensor:
    """Boolean mask [B, 1, T, S] for T new queries over S keys, where row b's first num_past[b]
    keys are past entries (all visible) and the new tokens' keys follow them in order.

    Query t of row b sees keys j < num_past[b] + t + 1.
    """
    t = torch.arange(num_new, device=num_past.device)
    j = torch.arange(num_keys, device=num_past.device)
    limit = num_past.view(-1, 1, 1) + t.view(1, -1, 1) + 1  # [B, T, 1]
    return (j.view(1, 1, -1) < limit).unsqueeze(1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: torch.Tensor | None, causal: bool = False) -> torch.Tensor:
    """q: [B, H, T, D]; k, v: [B, Hkv, S, D]; mask: bool [B, 1, T, S] or None (all visible).

    causal=True (with mask None) means T == S and query t sees keys <= t: a prefill from an
    empty cache, which takes the fused causal kernel instead of a materialised mask.
    Returns [B, H, T, D]. GQA is handled without materialising repeated KV heads.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=q.shape[1] != k.shape[1])
