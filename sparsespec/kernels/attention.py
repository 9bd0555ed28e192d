"""Attention over gathered cache entries: the torch reference every cache uses, the verify path
that reads each row's past K/V once, and the one place that picks Triton or torch.

Backend selection (`use_triton`): Triton kernels (triton_attention.py) for CUDA tensors when
triton imports, the torch path everywhere else. SPARSESPEC_ATTENTION=torch|triton (or
`set_backend`) forces one; Triton on CPU tensors needs TRITON_INTERPRET=1 (the CI tests). The
caches call `attend`, `attend_block` and `attend_rows` and never see which one ran.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("SPARSESPEC_ATTENTION", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"SPARSESPEC_ATTENTION must be one of {', '.join(BACKENDS)}, got {_backend!r}")


def set_backend(name: str) -> str:
    """Force the attention backend ("auto": Triton on CUDA, torch elsewhere). Returns the old one."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    old, _backend = _backend, name
    return old


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(device: torch.device) -> bool:
    """Whether attention on `device` runs the Triton kernels: the single switch."""
    if _backend == "torch":
        return False
    if _backend == "triton":
        return True
    return device.type == "cuda" and triton_available()


def causal_block_mask(num_past: torch.Tensor, num_new: int, num_keys: int,
                      window: int | None = None) -> torch.Tensor:
    """Boolean mask [B, 1, T, S] for T new queries over S keys, where row b's first num_past[b]
    keys are past entries (all visible) and the new tokens' keys follow them in order.

    Query t of row b (position p = num_past[b] + t) sees keys j <= p; with a sliding `window` W
    (a Gemma 3 local layer) only p - W < j <= p.
    """
    t = torch.arange(num_new, device=num_past.device)
    j = torch.arange(num_keys, device=num_past.device).view(1, 1, -1)
    p = num_past.view(-1, 1, 1) + t.view(1, -1, 1)           # [B, T, 1]
    visible = j <= p
    if window is not None:
        visible &= j > p - window
    return visible.unsqueeze(1)


def attend_window(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, past: torch.Tensor,
                  window: int) -> torch.Tensor:
    """Attention of a sliding-window layer: the query at position p sees keys p - W < j <= p.

    q: [B, H, T, D] at positions past[b] + t; keys, values: [B, Hkv, S, D], row b's entries at
    their positions (the T new ones included); past: [B] (host). Returns [B, H, T, D], exact: the
    queries go in blocks of at most W, and each block attends over the at most 2W - 1 keys its
    rows can see (a gather per row: rows may differ in length), with a [B, 1, Tb, <2W] mask. So a
    16K prefill never builds a T x S mask, and a decode or verify reads W + T - 1 keys per row.
    """
    B, H, T, D = q.shape
    S = keys.shape[2]
    dev = q.device
    past_d = past.to(dev).view(B, 1)
    out = []
    for t0 in range(0, T, window):
        tb = min(window, T - t0)
        span = window + tb - 1                                                 # keys this block can see
        first = past_d + (t0 - window + 1)                                     # [B, 1] position of slot 0
        pos = first + torch.arange(span, device=dev).view(1, -1)              # [B, L] key positions
        index = pos.clamp(0, S - 1)
        gather = index.view(B, 1, span, 1).expand(B, keys.shape[1], span, D)
        k_blk, v_blk = keys.gather(2, gather), values.gather(2, gather)        # [B, Hkv, L, D]
        p = past_d.view(B, 1, 1) + (t0 + torch.arange(tb, device=dev)).view(1, -1, 1)  # [B, Tb, 1]
        j = pos.view(B, 1, span)
        mask = ((j <= p) & (j > p - window) & (j >= 0)).unsqueeze(1)           # [B, 1, Tb, L]
        out.append(attend(q[:, :, t0:t0 + tb], k_blk, v_blk, mask))
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: torch.Tensor | None, causal: bool = False) -> torch.Tensor:
    """q: [B, H, T, D]; k, v: [B, Hkv, S, D]; mask: bool [B, 1, T, S] or None (all visible).

    causal=True (with mask None) means T == S and query t sees keys <= t: a prefill from an
    empty cache, which takes the fused causal kernel instead of a materialised mask.
    Returns [B, H, T, D]. GQA is handled without materialising repeated KV heads.

    A decode step (T = 1) with GQA folds the G query heads of each KV head into the query axis:
    one [G]-query attention per KV head, exact (one query sees all its row's keys either way) and
    several times faster on CPU than SDPA's enable_gqa path (7x in bf16 at 8 rows x 300 keys).
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if T == 1 and mask is None and not causal and use_triton(q.device):
        from sparsespec.kernels.triton_attention import decode_views
        return decode_views(q, list(k.unbind(0)), list(v.unbind(0)))
    if T == 1 and H != Hkv and not causal:
        out = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, D), k, v, attn_mask=mask)  # [B, Hkv, G, D]
        return out.reshape(B, H, 1, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=H != Hkv)


# Widest new block `attend_block` takes: a round's k + 1 (MAX_K = 64). Wider forwards (a
# multi-turn extend) keep the masked path.
MAX_BLOCK = 65


@functools.lru_cache(maxsize=None)
def _future(t: int, device: torch.device) -> torch.Tensor:
    """[T, T] True above the diagonal: the new keys a new query must not see (built once per T)."""
    return torch.ones(t, t, dtype=torch.bool, device=device).triu(1)


def block_supported(device: torch.device, num_new: int) -> bool:
    """`attend_block` runs on CPU tensors (the torch path needs the fused CPU kernel's
    log-sum-exp) for a verify (2..65 new tokens), and wherever Triton runs for 1..65 (the
    split-K kernel also takes the verifier's AR step over rows of different lengths)."""
    if use_triton(device):
        return 1 <= num_new <= MAX_BLOCK
    return device.type == "cpu" and 1 < num_new <= MAX_BLOCK


def attend_rows(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """A decode step of B sessions, each over its own view: q [B, H, 1, D]; keys[b], values[b]
    [Hkv, n_b, D] (every entry visible). Returns [B, H, 1, D].

    Triton: one launch for the batch when the views share a layout (the drafter's fixed-shape
    device views do), reading them in place through a pointer table. Torch: one `attend` per row.
    """
    if use_triton(q.device) and len({(k.stride(), v.stride()) for k, v in zip(keys, values)}) == 1:
        from sparsespec.kernels.triton_attention import decode_views
        return decode_views(q, keys, values)
    return torch.cat([attend(q[b:b + 1], k.unsqueeze(0), v.unsqueeze(0), None)
                      for b, (k, v) in enumerate(zip(keys, values))])


def attend_block(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 past: torch.Tensor) -> torch.Tensor:
    """Attention of T new queries per row whose own keys follow that row's past: a verify.

    q: [B, H, T, D]; keys, values: [B, Hkv, S, D] with row b's past at [:past[b]] and its T new
    entries at [past[b], past[b] + T); past: [B] (host). Returns [B, H, T, D], equal to `attend`
    with `causal_block_mask` to fp32 rounding, but without a [B, 1, T, S] mask or repeated KV
    heads: the query heads of each KV head are stacked into one [G*T]-query attention over the
    past (every past key is visible to every new query; rows of different lengths get a
    [B, 1, 1, S] key-padding mask), the T x T causal block is computed apart, and the two are
    merged by their log-sum-exp. So a k-token verify reads each row's past K/V once, as an AR
    step does.
    """
    if use_triton(q.device):
        from sparsespec.kernels.triton_attention import verify
        return verify(q, keys, values, past)
    B, H, T, D = q.shape
    Hkv = keys.shape[1]
    G = H // Hkv
    starts = past.tolist()
    longest = max(starts)
    qg = q.reshape(B, Hkv, G * T, D)                                       # heads of a KV head stacked
    mask = None
    if min(starts) != longest:
        visible = torch.arange(longest, device=q.device).view(1, 1, 1, -1) < past.to(q.device).view(B, 1, 1, 1)
        mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
    if longest > 0:
        out_p, lse_p = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qg, keys[:, :, :longest], values[:, :, :longest], attn_mask=mask)   # [B, Hkv, G*T, D], [B, Hkv, G*T]
        out_p, lse_p = out_p.reshape(B, H, T, D), lse_p.reshape(B, H, T)
        if min(starts) == 0:                 # a row without a past: the kernel's lse is not -inf there
            lse_p = lse_p.masked_fill(past.to(q.device).view(B, 1, 1) == 0, float("-inf"))
    if len(set(starts)) == 1:
        k_new, v_new = keys[:, :, longest:longest + T], values[:, :, longest:longest + T]   # [B, Hkv, T, D]
    else:
        k_new = torch.stack([keys[b, :, p:p + T] for b, p in enumerate(starts)])
        v_new = torch.stack([values[b, :, p:p + T] for b, p in enumerate(starts)])
    # The block and the merge in fp32 (tiny), like the fused kernel's accumulators.
    qb = q.reshape(B, Hkv, G, T, D).float()
    scores = qb @ k_new.unsqueeze(2).float().transpose(-1, -2) * D ** -0.5   # [B, Hkv, G, T, T]
    scores = scores.masked_fill(_future(T, q.device), float("-inf"))
    lse_b = torch.logsumexp(scores, dim=-1).reshape(B, H, T)
    out_b = (torch.softmax(scores, dim=-1) @ v_new.unsqueeze(2).float()).reshape(B, H, T, D)
    if longest == 0:
        return out_b.to(q.dtype)
    top = torch.maximum(lse_p.float(), lse_b)
    w_p, w_b = torch.exp(lse_p - top), torch.exp(lse_b - top)
    out_p = torch.where(w_p.unsqueeze(-1) > 0, out_p.float(), 0.0)   # a fully masked past may hold NaN
    out = (out_p * w_p.unsqueeze(-1) + out_b * w_b.unsqueeze(-1)) / (w_p + w_b).unsqueeze(-1)
    return out.to(q.dtype)

