"""The verify attention (`attend_block`) equals the masked reference to fp32 rounding."""

from __future__ import annotations

import pytest
import torch

from sparsespec.kernels.attention import attend, attend_block, block_supported, causal_block_mask


@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 2), (9, 3)])
@pytest.mark.parametrize("past", [[37], [0], [50, 50, 50], [50, 3, 0, 17], [1, 64]])
@pytest.mark.parametrize("t", [2, 5, 9])
def test_block_attention_equals_masked_reference(heads, past, t):
    H, Hkv = heads
    B, D = len(past), 16
    g = torch.Generator().manual_seed(H * 100 + t + sum(past))
    S = max(past) + t + 3                                  # spare entries past every row: never read
    q = torch.randn(B, H, t, D, generator=g)
    keys, values = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    lengths = torch.tensor(past)
    width = max(past) + t
    ref = attend(q, keys[:, :, :width], values[:, :, :width], causal_block_mask(lengths, t, width))
    out = attend_block(q, keys[:, :, :width], values[:, :, :width], lengths)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_bf16_block_stays_close_and_only_cpu_takes_it():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 5, 32, generator=g)
    keys, values = torch.randn(2, 2, 300, 32, generator=g), torch.randn(2, 2, 300, 32, generator=g)
    lengths = torch.tensor([295, 120])
    ref = attend(q, keys, values, causal_block_mask(lengths, 5, 300))
    out = attend_block(q.bfloat16(), keys.bfloat16(), values.bfloat16(), lengths)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.05
    assert block_supported(torch.device("cpu"), 5) and not block_supported(torch.device("cpu"), 1)
    assert not block_supported(torch.device("meta"), 5) and not block_supported(torch.device("cpu"), 66)


def _repeated_kv_reference(q, k, v, mask):
    """Plain softmax attention with the KV heads repeated, in float64: the definition."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    scores = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("heads", [(4, 2), (9, 3), (8, 8)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_decode_step_folds_query_heads_exactly(heads, dtype, tol):
    h, hkv = heads
    g = torch.Generator().manual_seed(h)
    q = torch.randn(3, h, 1, 16, generator=g).to(dtype)
    k, v = (torch.randn(3, hkv, 40, 16, generator=g).to(dtype) for _ in range(2))
    lengths = torch.tensor([40, 17, 1])
    padding = (torch.arange(40).view(1, 1, 1, -1) < lengths.view(-1, 1, 1, 1))   # rows of different lengths
    for mask in (None, padding):
        out = attend(q, k, v, mask)
        assert out.shape == q.shape and out.dtype == dtype
        assert (out.double() - _repeated_kv_reference(q, k, v, mask)).abs().max() < tol


@pytest.fixture
def two_threads():
    """The sliced path runs where a single row's KV heads do not share out over the threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("past", [1024, 1027, 1537])      # slices of 512 and 513 keys, a remainder of 0, 1 and 1
@pytest.mark.parametrize("t", [1, 5])
def test_a_single_row_sliced_over_its_past_is_exact(two_threads, past, t):
    """One row, 3 KV heads, 2 threads: the past goes as slices attended as a batch, the rest with
    the new keys, merged by log-sum-exp; an AR step (t = 1) and a verify equal the definition."""
    from sparsespec.kernels import attention
    assert attention._slices(1, 3, past) == 2 and attention._slices(2, 3, past) == 1
    assert attention._slices(1, 4, past) == 1 and attention._slices(1, 3, 511) == 1
    g = torch.Generator().manual_seed(past + t)
    q = torch.randn(1, 9, t, 64, generator=g)
    keys, values = torch.randn(1, 3, past + t + 7, 64, generator=g), torch.randn(1, 3, past + t + 7, 64, generator=g)
    width = past + t
    k, v = keys[:, :, :width], values[:, :, :width]
    mask = causal_block_mask(torch.tensor([past]), t, width)
    want = _repeated_kv_reference(q, k, v, mask)
    got = attend(q, k, v, None) if t == 1 else attend_block(q, k, v, torch.tensor([past]))
    assert (got.double() - want).abs().max() < 1e-5
