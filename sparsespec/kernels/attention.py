"""Attention over gathered cache entries: the torch reference every cache uses, the verify path
that reads each row's past K/V once, and the one place that picks Triton or torch.

Backend selection (`use_triton`): Triton kernels (triton_attention.py) for CUDA tensors when
triton imports, the torch path everywhere else. SPARSESPEC_ATTENTION=torch|triton (or
`set_backend`) forces one; Triton on CPU tensors needs TRITON_INTERPRET=1 (the CI tests). The
caches call `attend`, `attend_block` and `attend_rows` and never see which one ran.
"""

from __future__ import annotations

import functools
import math
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
        qg = q.reshape(B, Hkv, H // Hkv, D)
        if mask is None and q.device.type == "cpu" and _slices(B, Hkv, k.shape[2]) > 1:
            return _over_past_and_new(qg, k, v, k.shape[2] - 1, 1).reshape(B, H, 1, D)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)                     # [B, Hkv, G, D]
        return out.reshape(B, H, 1, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=H != Hkv)


# Widest new block `attend_block` takes: a round's k + 1 (MAX_K = 64). Wider forwards (a
# multi-turn extend) keep the masked path.
MAX_BLOCK = 65


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
    [B, 1, 1, S] key-padding mask), the T x T causal block is a second attention with a cached
    [G*T, T] mask, and the two are merged by their log-sum-exp. So a k-token verify reads each
    row's past K/V once, as an AR step does.
    """
    if use_triton(q.device):
        from sparsespec.kernels.triton_attention import verify
        return verify(q, keys, values, past)
    B, H, T, D = q.shape
    Hkv = keys.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv * T, D)                                 # heads of a KV head stacked
    starts = past.tolist()
    longest = max(starts)
    if len(set(starts)) == 1:
        return _over_past_and_new(qg, keys, values, longest, T).reshape(B, H, T, D)
    visible = torch.arange(longest, device=q.device).view(1, 1, 1, -1) < past.to(q.device).view(B, 1, 1, 1)
    padding = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
    out_p, lse_p = _FLASH(qg, keys[:, :, :longest], values[:, :, :longest], attn_mask=padding)
    if min(starts) == 0:                     # a row without a past: its part holds nothing (NaN here)
        empty = past.to(q.device).view(B, 1, 1) == 0
        out_p, lse_p = out_p.masked_fill(empty.unsqueeze(-1), 0.0), lse_p.masked_fill(empty, float("-inf"))
    k_new = torch.stack([keys[b, :, p:p + T] for b, p in enumerate(starts)])   # [B, Hkv, T, D]
    v_new = torch.stack([values[b, :, p:p + T] for b, p in enumerate(starts)])
    block = _FLASH(qg, k_new, v_new, attn_mask=_tail_bias(H // Hkv, T, 0, q.dtype, q.device))
    return _merge([(out_p, lse_p), block]).reshape(B, H, T, D)


# The CPU flash kernel: it returns the log-sum-exp that merging partial attentions needs.
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
SLICE_MIN_KEYS = 512   # a slice of the past shorter than this is not worth a work item of its own


def _slices(batch: int, kv_heads: int, keys: int) -> int:
    """Into how many slices of the KV length one row's attention goes on the CPU, so that every
    thread gets a share: the flash kernel splits work by (row, KV head), and one row's 3 KV heads
    on 2 threads leave a thread idle a third of the time (SmolLM2 at 4K, 30 layers: 9.5 ms as
    is, 6.3 ms in 2 slices; a verify's 15 queries 17.0 -> 12.9 ms). Rows of a batch already
    share out; only a single row is sliced (its slices become the kernel's batch, a view)."""
    if batch != 1:
        return 1
    threads = torch.get_num_threads()
    return max(1, min(threads // math.gcd(kv_heads, threads), keys // SLICE_MIN_KEYS))


def _over_past_and_new(qg: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, past: int,
                       t: int) -> torch.Tensor:
    """Rows of one length on the CPU: qg [B, Hkv, G*t, D] (query g*t + i is new token i of query
    head g) over keys, values [B, Hkv, >= past + t, D] whose first `past` entries every query
    sees and whose next t are the new tokens' own (causal). Returns [B, Hkv, G*t, D].

    The past goes as n slices of c keys attended unmasked ([n, Hkv, c, D] views of a single
    row), the rest of it (r < n keys) with the new keys in one attention under a cached
    [G*t, r + t] mask, and the parts are merged by their log-sum-exp."""
    B, Hkv, Q, D = qg.shape
    n = _slices(B, Hkv, past)
    c = past // n                                                             # n * c <= past keys in slices
    parts = []
    if n > 1:
        k_sl = keys[0, :, :n * c].unflatten(1, (n, c)).transpose(0, 1)        # [n, Hkv, c, D], a view
        v_sl = values[0, :, :n * c].unflatten(1, (n, c)).transpose(0, 1)
        out, lse = _FLASH(qg.expand(n, -1, -1, -1), k_sl, v_sl)               # [n, Hkv, Q, D], [n, Hkv, Q]
        parts.append((out.unsqueeze(1), lse.unsqueeze(1)))                    # n parts of the one row
    elif c:
        parts.append(_FLASH(qg, keys[:, :, :c], values[:, :, :c]))
    done = n * c
    tail = slice(done, past + t)
    parts.append(_FLASH(qg, keys[:, :, tail], values[:, :, tail],
                        attn_mask=_tail_bias(Q // t, t, past - done, qg.dtype, qg.device)))
    return _merge(parts)


@functools.lru_cache(maxsize=None)
def _tail_bias(g: int, t: int, r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """[1, 1, G*t, r + t]: r past keys every query sees, then t new keys each new query sees up to
    its own (-inf above the diagonal), repeated for the G query heads. None when all are visible."""
    if t == 1:
        return None
    future = torch.ones(t, t, dtype=torch.bool, device=device).triu(1)
    bias = torch.zeros(t, r + t, dtype=dtype, device=device)
    bias[:, r:].masked_fill_(future, float("-inf"))
    return bias.repeat(g, 1).view(1, 1, g * t, r + t)


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attentions of the same queries over disjoint keys -> the attention over all of them.

    parts: (out [..., Q, D], lse [..., Q]) whose shapes broadcast to [m, B, Hkv, Q, (D)] (a part of
    m slices has m leading) or [B, Hkv, Q, (D)]. Weights exp(lse - total) in fp32, like the
    kernel's accumulators; returns [B, Hkv, Q, D] in the parts' dtype."""
    if len(parts) == 1:
        return parts[0][0]
    outs = torch.cat([o.float() if o.dim() == 5 else o.float().unsqueeze(0) for o, _ in parts])  # [m, B, Hkv, Q, D]
    lses = torch.cat([l.float() if l.dim() == 4 else l.float().unsqueeze(0) for _, l in parts])  # [m, B, Hkv, Q]
    weights = torch.softmax(lses, dim=0).unsqueeze(-1)                       # exp(lse - logsumexp(lse))
    return (outs * weights).sum(0).to(parts[0][0].dtype)
