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
