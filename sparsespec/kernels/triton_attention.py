"""Triton kernels for the two attentions a GPU spends its time in.

- `decode_views`: the drafter's decode step (one new query per session) over each session's own
  sparse device view. The views are separate allocations of one fixed shape (budget + tail), so
  the kernel reads them through a table of base pointers instead of stacking copies: one program
  per (session, KV head), the G query heads of that KV head padded to a power of two and masked.
- `verify`: the verifier's T = k + 1 new queries per row over long rows of different lengths,
  split over the KV length (flash-decoding): each split keeps a running max / sum / output, and
  a second kernel merges the splits by their log-sum-exp. A row's work stops at its own length,
  so short rows in a batch with a long one cost what they hold.

Semantics are those of the torch reference in attention.py (`attend` with `causal_block_mask`,
`attend_block`): query t of row b sees keys j < past[b] + t + 1, softmax in fp32, scale D^-1/2.
Inputs may be fp32, fp16 or bf16; accumulators are fp32; fp32 dots run in IEEE precision (no
TF32) so the kernels match the reference to fp32 rounding. Imported only where Triton is used
(attention.py selects); on CPU the tests run these kernels under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 16          # keys per inner step (tl.dot needs >= 16 on every axis)
MIN_BLOCK = 16
MAX_BLOCK_M = 64      # queries per program: G * T padded; wider groups take several programs
DEFAULT_SPLIT = 512   # keys per split of the verify (the split count grows with the longest row)
MAX_SPLITS = 64


def _pow2(n: int, floor: int = MIN_BLOCK) -> int:
    return max(floor, triton.next_power_of_2(max(1, n)))


@triton.jit
def _online_step(q, k, v, acc, m_i, l_i, visible, scale, IEEE: tl.constexpr):
    """One BLOCK_N slice of keys folded into a running softmax (max m_i, sum l_i, output acc).

    q [BM, BD], k / v [BN, BD], visible [BM, BN]. A row that has seen no visible key keeps
    m_i = -inf, l_i = 0, acc = 0 (no NaN: its max is replaced by 0 before any exp)."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(visible, s * scale, float("-inf"))                  # [BM, BN] fp32
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _decode_views_kernel(Q, KPTR, VPTR, LEN, O,
                         sq_b, sq_h, sq_d, sk_h, sk_n, sk_d, so_b, so_h, so_d,
                         G, D, scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         IEEE: tl.constexpr):
    """Program (b, kvh): the G query heads of KV head kvh of session b over its first LEN[b]
    view entries. Q / O [B, H, 1, D]; KPTR / VPTR [B] int64 base pointers of [Hkv, N, D] views
    that share strides (sk_*)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    n = tl.load(LEN + b)
    offs_m = tl.arange(0, BLOCK_M)                                   # the group, padded
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < G
    d_ok = offs_d < D
    h = kvh * G + offs_m
    q = tl.load(Q + b * sq_b + h[:, None] * sq_h + offs_d[None, :] * sq_d,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    kbase = tl.load(KPTR + b).to(tl.pointer_type(Q.dtype.element_ty)) + kvh * sk_h
    vbase = tl.load(VPTR + b).to(tl.pointer_type(Q.dtype.element_ty)) + kvh * sk_h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n
        kv_off = offs_n[:, None] * sk_n + offs_d[None, :] * sk_d
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(kbase + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(vbase + kv_off, mask=kv_mask, other=0.0)
        visible = m_ok[:, None] & n_ok[None, :]
        acc, m_i, l_i = _online_step(q, k, v, acc, m_i, l_i, visible, scale, IEEE)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(O + b * so_b + h[:, None] * so_h + offs_d[None, :] * so_d,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _verify_split_kernel(Q, K, V, PAST, OP, LSEP,
                         sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_s, sk_d,
                         sv_b, sv_h, sv_s, sv_d,
                         Hkv, T, G, D, NS, scale, split_len,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         IEEE: tl.constexpr):
    """Program (b * Hkv + kvh, split, m tile): queries m = g * T + t of KV head kvh of row b
    (the group's heads stacked, as `attend_block` does) over keys [split * split_len, ...) of
    that row, cut at the row's end past[b] + T. Writes the split's normalised softmax output
    OP [B, H, T, NS, D] and its log-sum-exp LSEP [B, H, T, NS] (-inf if it saw no key)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // Hkv
    kvh = bh % Hkv
    past = tl.load(PAST + b)
    row_end = past + T
    lo = split * split_len
    hi = tl.minimum(lo + split_len, row_end)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < G * T
    d_ok = offs_d < D
    g = offs_m // T
    t = offs_m % T
    h = kvh * G + g
    q = tl.load(Q + b * sq_b + h[:, None] * sq_h + t[:, None] * sq_t + offs_d[None, :] * sq_d,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    limit = past + t + 1                                             # [BM]: keys query t may see
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * sk_b + kvh * sk_h + offs_n[:, None] * sk_s + offs_d[None, :] * sk_d,
                    mask=kv_mask, other=0.0)
        v = tl.load(V + b * sv_b + kvh * sv_h + offs_n[:, None] * sv_s + offs_d[None, :] * sv_d,
                    mask=kv_mask, other=0.0)
        visible = m_ok[:, None] & n_ok[None, :] & (offs_n[None, :] < limit[:, None])
        acc, m_i, l_i = _online_step(q, k, v, acc, m_i, l_i, visible, scale, IEEE)
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    H = Hkv * G
    row = (b * H + h) * T + t                                        # index into [B, H, T]
    tl.store(OP + (row[:, None] * NS + split) * D + offs_d[None, :], out, mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSEP + row * NS + split, lse, mask=m_ok)


@triton.jit
def _merge_kernel(OP, LSEP, O, T, H, NS, D, so_b, so_h, so_t, so_d,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program r = (b * H + h) * T + t: the NS split outputs merged by their log-sum-exp."""
    r = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NS
    d_ok = offs_d < D
    lse = tl.load(LSEP + r * NS + offs_s, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse - top)                                            # [BS], 0 for empty splits
    part = tl.load(OP + (r * NS + offs_s[:, None]) * D + offs_d[None, :],
                   mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    t = r % T
    bh = r // T
    tl.store(O + (bh // H) * so_b + (bh % H) * so_h + t * so_t + offs_d * so_d,
             out.to(O.dtype.element_ty), mask=d_ok)


def decode_views(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """q: [B, H, 1, D]; keys[b], values[b]: [Hkv, n_b, D] views (prefixes of per-session buffers
    that share strides). Returns [B, H, 1, D]: row b's queries over all n_b of its entries."""
    B, H, T, D = q.shape
    if T != 1 or len(keys) != B or len(values) != B:
        raise ValueError(f"decode_views takes one query per row and one view per row: q {tuple(q.shape)}, "
                         f"{len(keys)} views")
    Hkv = keys[0].shape[0]
    strides = keys[0].stride()
    if any(k.stride() != strides or v.stride() != strides for k, v in zip(keys, values)):
        raise ValueError("decode_views needs views of one layout (same strides)")
    dev = q.device
    kptr = torch.tensor([k.data_ptr() for k in keys], dtype=torch.int64, device=dev)
    vptr = torch.tensor([v.data_ptr() for v in values], dtype=torch.int64, device=dev)
    lengths = torch.tensor([k.shape[1] for k in keys], dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    G = H // Hkv
    _decode_views_kernel[(B, Hkv)](
        q, kptr, vptr, lengths, out,
        q.stride(0), q.stride(1), q.stride(3), strides[0], strides[1], strides[2],
        out.stride(0), out.stride(1), out.stride(3),
        G, D, D ** -0.5,
        BLOCK_M=_pow2(G), BLOCK_N=BLOCK_N, BLOCK_D=_pow2(D), IEEE=q.dtype == torch.float32)
    return out


def verify(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, past: torch.Tensor,
           split_len: int | None = None) -> torch.Tensor:
    """q: [B, H, T, D]; keys, values: [B, Hkv, S, D] with row b's past at [:past[b]] and its T new
    entries right after; past: [B]. Returns [B, H, T, D] (as `attend_block`). split_len: keys per
    split (a multiple of BLOCK_N; default grows with the longest row, at most MAX_SPLITS)."""
    B, H, T, D = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    G = H // Hkv
    longest = int(past.max()) + T
    if longest > S:
        raise ValueError(f"rows reach {longest} keys but the cache view holds {S}")
    if split_len is None:
        split_len = max(DEFAULT_SPLIT, triton.cdiv(triton.cdiv(longest, MAX_SPLITS), BLOCK_N) * BLOCK_N)
    if split_len % BLOCK_N:
        raise ValueError(f"split_len must be a multiple of {BLOCK_N}, got {split_len}")
    NS = triton.cdiv(longest, split_len)
    past_dev = past.to(device=q.device, dtype=torch.int32)
    part = torch.empty(B, H, T, NS, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, T, NS, dtype=torch.float32, device=q.device)
    block_m = min(MAX_BLOCK_M, _pow2(G * T))
    _verify_split_kernel[(B * Hkv, NS, triton.cdiv(G * T, block_m))](
        q, keys, values, past_dev, part, lse,
        *q.stride(), *keys.stride(), *values.stride(),
        Hkv, T, G, D, NS, D ** -0.5, split_len,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=_pow2(D), IEEE=q.dtype == torch.float32)
    out = torch.empty_like(q)
    _merge_kernel[(B * H * T,)](part, lse, out, T, H, NS, D, *out.stride(),
                                BLOCK_S=_pow2(NS, 1), BLOCK_D=_pow2(D))
    return out
