"""kernels.linear: the oneDNN fp32 CPU matmul is F.linear to fp32 rounding, and runs only where it should."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from sparsespec.kernels import linear as kernel

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")

ONEDNN = "mkldnn::_linear_pointwise"
IN, OUT = 512, 512                       # a weight of MIN_WEIGHT elements: the smallest oneDNN takes
assert IN * OUT == kernel.MIN_WEIGHT


def ran_onednn(fn) -> bool:
    with profile() as p:
        fn()
    return any(e.key == ONEDNN for e in p.key_averages())


def onednn_rows(fn) -> list[int]:
    """The row count of every oneDNN call fn makes."""
    with profile(record_shapes=True) as p:
        fn()
    return [e.input_shapes[0][0] for e in p.events() if e.name == ONEDNN]


@pytest.mark.parametrize("shape,onednn", [((1, IN), True), ((5, IN), True), ((3, 7, IN), True), ((IN,), True),
                                          ((64, IN), True), ((65, IN), False), ((0, IN), False),
                                          ((2, 0, IN), False)])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_f_linear(shape, onednn, bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(OUT, IN, generator=g)
    b = torch.randn(OUT, generator=g) if bias else None
    x = torch.randn(shape, generator=g)
    with torch.inference_mode():
        out = kernel.linear(x, w, b)
        assert ran_onednn(lambda: kernel.linear(x, w, b)) == onednn
        assert out.shape == F.linear(x, w, b).shape
        torch.testing.assert_close(out, F.linear(x, w, b), rtol=0, atol=1e-4)


def test_rows_are_padded_to_a_bounded_set_of_shapes():
    """oneDNN keeps one compiled primitive per shape (~0.6 MB): rows 1..64 must reach it as the
    12 bucket sizes only, or a server's memory grows with every new row count."""
    w = torch.randn(OUT + 8, IN)         # a shape no other test uses: its first call builds every bucket
    with torch.inference_mode():
        assert onednn_rows(lambda: kernel.linear(torch.randn(5, IN), w)) == [*kernel.ROW_BUCKETS, 6]
        seen = onednn_rows(lambda: [kernel.linear(torch.randn(m, IN), w) for m in range(1, 65)])
    assert len(seen) == 64 and set(seen) == set(kernel.ROW_BUCKETS), sorted(set(seen))


def test_non_contiguous_input_and_weight():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2 * IN, generator=g)[:, ::2]       # [6, IN], stride 2
    w = torch.randn(IN, OUT, generator=g).t()             # [OUT, IN], transposed
    with torch.no_grad():
        assert ran_onednn(lambda: kernel.linear(x, w))
        torch.testing.assert_close(kernel.linear(x, w), F.linear(x, w), rtol=0, atol=1e-4)


def test_small_weights_take_f_linear():
    """Under MIN_WEIGHT elements a weight stays in cache, where oneDNN's per-call cost is the
    whole cost (the tests' tiny models ran slower with it)."""
    w = torch.randn(OUT, IN - 1)
    with torch.inference_mode():
        assert not ran_onednn(lambda: kernel.linear(torch.randn(5, IN - 1), w))


def test_training_bf16_and_forced_torch_take_f_linear():
    lin = kernel.Linear(IN, OUT)
    x = torch.randn(3, IN, requires_grad=True)
    assert not ran_onednn(lambda: lin(x).sum().backward())     # autograd on: gradients must flow
    assert lin.weight.grad is not None and x.grad is not None
    with torch.no_grad():
        xb, wb = torch.randn(3, IN).bfloat16(), lin.weight.bfloat16()
        assert not ran_onednn(lambda: kernel.linear(xb, wb))
        old = kernel.set_backend("torch")
        try:
            assert not ran_onednn(lambda: lin(x))
            assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
        finally:
            kernel.set_backend(old)
        assert ran_onednn(lambda: lin(x))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="SPARSESPEC_LINEAR"):
        kernel.set_backend("mkl")


def _blocked_for(w: torch.Tensor) -> torch.Tensor | None:
    kept = kernel._blocked.get(id(w))
    return kept[3] if kept is not None and kept[0]() is w else None


def test_a_blocked_copy_is_made_once_and_follows_its_weight():
    """The blocked copy is reused while the weight is unchanged, and made again when the weight
    is updated in place (an optimizer step, load_state_dict) or its data re-pointed (PackedLinear):
    a stale copy would decode with the old weights."""
    g = torch.Generator().manual_seed(2)
    lin = kernel.Linear(IN, OUT)
    x = torch.randn(5, IN, generator=g)
    with torch.inference_mode():
        lin(x)
        first = _blocked_for(lin.weight)
        assert first is not None
        lin(x)
        assert _blocked_for(lin.weight) is first
    with torch.no_grad():
        lin.weight.copy_(torch.randn(OUT, IN, generator=g))             # in place: a new version
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=0, atol=1e-4)
    lin.weight.data = torch.randn(OUT, IN, generator=g)                 # re-pointed: a new data_ptr
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=0, atol=1e-4)


def test_a_blocked_copy_goes_with_its_weight():
    """The copy doubles a weight's memory: it must be freed with the weight, not kept by id."""
    w = torch.randn(OUT, IN)
    with torch.inference_mode():
        kernel.linear(torch.randn(2, IN), w)
    key = id(w)
    assert key in kernel._blocked
    del w
    assert key not in kernel._blocked


def test_dense_backend_and_inference_weights_keep_no_copy():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, IN, generator=g)
    w = torch.randn(OUT, IN, generator=g)
    old = kernel.set_backend("dense")
    try:
        with torch.inference_mode():
            assert ran_onednn(lambda: kernel.linear(x, w))
            torch.testing.assert_close(kernel.linear(x, w), F.linear(x, w), rtol=0, atol=1e-4)
    finally:
        kernel.set_backend(old)
    assert _blocked_for(w) is None
    with torch.inference_mode():
        made_here = torch.randn(OUT, IN, generator=g)                  # no version counter to follow
        torch.testing.assert_close(kernel.linear(x, made_here), F.linear(x, made_here), rtol=0, atol=1e-4)
    assert _blocked_for(made_here) is None


def test_a_packed_layer_keeps_following_its_parameters_after_a_first_call_in_inference_mode():
    """PackedLinear stacks q/k/v on its first call, usually a prefill inside inference mode: the
    stack must still be a normal tensor, so a later in-place update reaches the blocked copy."""
    from sparsespec.models.packed import PackedLinear
    g = torch.Generator().manual_seed(4)
    a, b = kernel.Linear(IN, OUT, bias=False), kernel.Linear(IN, OUT, bias=False)
    packed = PackedLinear(a, b)
    x = torch.randn(4, IN, generator=g)
    with torch.inference_mode():
        packed(x)
    with torch.no_grad():
        a.weight.copy_(torch.randn(OUT, IN, generator=g))
    with torch.inference_mode():
        want = torch.cat([F.linear(x, a.weight), F.linear(x, b.weight)], dim=-1)
        torch.testing.assert_close(packed(x), want, rtol=0, atol=1e-4)
