"""The Triton kernels (sparsespec/kernels/triton_attention.py) equal the torch reference.

CI has no GPU: the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before triton
is imported) on CPU tensors, on small shapes. scripts/gpu_check.sh runs this same file on CUDA
(SPARSESPEC_TEST_DEVICE=cuda), where the kernels are compiled.
"""

from __future__ import annotations

import os

DEVICE = os.environ.get("SPARSESPEC_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"   # read when the kernels are defined (their module's import)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")   # pinned in requirements/base.txt: skipped only outside the set-up

from sparsespec.kernels import attention  # noqa: E402
from sparsespec.kernels import triton_attention as ta  # noqa: E402
from sparsespec.kernels.attention import attend, attend_block, causal_block_mask  # noqa: E402

if DEVICE == "cpu" and not ta.triton.knobs.runtime.interpret:
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could take effect")

HKV = 2
GROUPS = [1, 3, 4]                       # query heads per KV head (3 pads to 4 in the kernels)
ROWS = [[37], [0, 0], [50, 3, 0, 17]]    # each row's past: one row, empty rows, ragged rows


def _randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def _reference(q, keys, values, past, t):
    """The torch path: `attend` with the block-causal mask, over the keys every row may reach."""
    width = int(past.max()) + t
    return attend(q.cpu().float(), keys[:, :, :width].cpu().float(), values[:, :, :width].cpu().float(),
                  causal_block_mask(past, t, width))


@pytest.mark.parametrize("t", [1, 2, 5])                 # k = 0, 1, 4
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("rows", ROWS)
def test_verify_kernel_equals_reference(rows, group, t):
    g = torch.Generator().manual_seed(100 * group + 10 * t + len(rows))
    B, H, D = len(rows), HKV * group, 16
    S = max(rows) + t + 5                                # spare garbage keys past every row: never read
    q, keys, values = _randn(g, B, H, t, D), _randn(g, B, HKV, S, D), _randn(g, B, HKV, S, D)
    past = torch.tensor(rows)
    ref = _reference(q, keys, values, past, t)
    # split_len 16: rows of up to 4 splits, so the log-sum-exp merge and empty splits are exercised
    for split_len in (16, None):
        out = ta.verify(q, keys, values, past, split_len=split_len)
        torch.testing.assert_close(out.cpu(), ref, atol=2e-6, rtol=1e-5)


# Half precision: the interpreter stores bf16 as uint16 and cannot multiply it (only convert), so
# on CPU the half-precision path (dots in the input dtype, fp32 accumulators) runs in fp16.
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def test_verify_kernel_half_long_rows_and_strided_queries():
    """Half precision (what a GPU runs), an odd head_dim (masked to the padded block), rows longer
    than one default split, and q as the model hands it over (a transposed, non-contiguous view)."""
    g = torch.Generator().manual_seed(7)
    B, H, T, D = 2, 6, 5, 24
    past = torch.tensor([600, 131])
    S = 610
    q = _randn(g, B, T, H, D).transpose(1, 2)            # [B, H, T, D], strided
    keys, values = _randn(g, B, HKV, S, D), _randn(g, B, HKV, S, D)
    ref = _reference(q, keys, values, past, T)
    out = ta.verify(q.to(HALF), keys.to(HALF), values.to(HALF), past)
    assert out.dtype == HALF and (out.cpu().float() - ref).abs().max() < 0.05
    out32 = ta.verify(q, keys, values, past)
    torch.testing.assert_close(out32.cpu(), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("lengths", [[40], [40, 17, 1], [33, 64]])
def test_decode_kernel_over_views_equals_reference(group, lengths):
    """Each row's view is a prefix of its own larger buffer (as the drafter's device view is of
    its budget + tail allocation): the kernel reads the buffers in place through pointers."""
    g = torch.Generator().manual_seed(group * 10 + len(lengths))
    H, D, cap = HKV * group, 16, 70
    bufs_k = [_randn(g, HKV, cap, D) for _ in lengths]
    bufs_v = [_randn(g, HKV, cap, D) for _ in lengths]
    keys = [b[:, :n] for b, n in zip(bufs_k, lengths)]
    values = [b[:, :n] for b, n in zip(bufs_v, lengths)]
    q = _randn(g, len(lengths), H, 1, D)
    ref = torch.cat([attend(q[i:i + 1].cpu(), k.cpu().unsqueeze(0), v.cpu().unsqueeze(0), None)
                     for i, (k, v) in enumerate(zip(keys, values))])
    out = ta.decode_views(q, keys, values)
    torch.testing.assert_close(out.cpu(), ref, atol=2e-6, rtol=1e-5)


def test_decode_kernel_refuses_views_of_different_layouts():
    g = torch.Generator().manual_seed(0)
    q = _randn(g, 2, 4, 1, 16)
    a, b = _randn(g, HKV, 30, 16), _randn(g, HKV, 50, 16)[:, :30]
    with pytest.raises(ValueError, match="same strides"):
        ta.decode_views(q, [a, b], [a, b])


@pytest.fixture
def triton_backend():
    old = attention.set_backend("triton")
    yield
    attention.set_backend(old)


def test_dispatch_routes_cache_calls_to_the_kernels(triton_backend, monkeypatch):
    """With the Triton backend, `attend_block`, a mask-free decode `attend` and `attend_rows`
    reach the kernels (counted) and still equal the torch path."""
    calls = {"verify": 0, "decode_views": 0}
    for name in calls:
        real = getattr(ta, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(ta, name, counted)
    g = torch.Generator().manual_seed(3)
    q, keys, values = _randn(g, 2, 6, 5, 16), _randn(g, 2, HKV, 40, 16), _randn(g, 2, HKV, 40, 16)
    past = torch.tensor([35, 20])
    torch.testing.assert_close(attend_block(q, keys[:, :, :40], values[:, :, :40], past).cpu(),
                               _reference(q, keys, values, past, 5), atol=2e-6, rtol=1e-5)
    q1 = q[:, :, :1]
    out = attend(q1, keys, values, None)
    attention.set_backend("torch")
    torch.testing.assert_close(out, attend(q1, keys, values, None), atol=2e-6, rtol=1e-5)
    rows_ref = attention.attend_rows(q1, [keys[0, :, :9], keys[1, :, :30]], [values[0, :, :9], values[1, :, :30]])
    attention.set_backend("triton")
    rows = attention.attend_rows(q1, [keys[0, :, :9], keys[1, :, :30]], [values[0, :, :9], values[1, :, :30]])
    torch.testing.assert_close(rows, rows_ref, atol=2e-6, rtol=1e-5)
    assert calls == {"verify": 1, "decode_views": 2}
    assert attention.block_supported(q.device, 1) and not attention.block_supported(q.device, 66)


def test_speculation_on_the_kernels_equals_ar(triton_backend, monkeypatch):
    """End to end on the Triton backend: two sessions of different lengths (ragged verifier rows,
    the drafter's batched decode over sparse views, k = 4 verifies) give AR's greedy tokens, and
    AR on the kernels gives the torch path's tokens."""
    from conftest import random_model
    from equality import assert_greedy_equal
    from kvstore.cache.sparse import SparseConfig
    from sparsespec.spec.drafter_host import DrafterHost, DrafterHostConfig, LocalDrafterClient
    from sparsespec.spec.loop import GenerationRequest, SpecEngine

    batches = {"verify": [], "decode_views": []}
    for name in batches:
        real = getattr(ta, name)

        def counted(q, *a, _real=real, _name=name, **kw):
            batches[_name].append(q.shape[0])
            return _real(q, *a, **kw)
        monkeypatch.setattr(ta, name, counted)
    model = random_model(seed=0).to(DEVICE)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (40, 90)]
    n_new = 12
    attention.set_backend("torch")
    torch_ar = [SpecEngine(model, None).generate(GenerationRequest(p, n_new, mode="ar")).token_ids for p in prompts]
    attention.set_backend("triton")
    ar = SpecEngine(model, None, max_batch=2).generate_many([GenerationRequest(p, n_new, mode="ar") for p in prompts])
    host = DrafterHost(model, DrafterHostConfig(SparseConfig(policy="chunk_topk", budget=16), model.max_context))
    spec = SpecEngine(model, LocalDrafterClient(host), max_batch=2).generate_many(
        [GenerationRequest(p, n_new, k=4) for p in prompts])
    for p, ref, a, s in zip(prompts, torch_ar, ar, spec):
        assert_greedy_equal(model, p, ref, a.token_ids, "AR triton vs torch")
        assert_greedy_equal(model, p, ref, s.token_ids, "spec triton vs AR")
        assert s.metrics.rounds > 0 and s.metrics.drafted > 0
    assert max(batches["verify"]) == 2 and max(batches["decode_views"]) == 2   # both rows in one launch
