"""PackedLinear: one matmul for q/k/v and gate/up, always equal to the separate layers."""

import torch
import torch.nn as nn

from sparsespec.models.packed import PackedLinear


def layers(bias: bool):
    torch.manual_seed(0)
    return [nn.Linear(8, n, bias=bias) for n in (8, 4, 4)]


def separate(ls, x):
    return torch.cat([l(x) for l in ls], dim=-1)


def test_packed_equals_separate_and_shares_memory():
    for bias in (False, True):
        ls = layers(bias)
        packed, x = PackedLinear(*ls), torch.randn(2, 3, 8)
        with torch.no_grad():
            out = packed(x)
            torch.testing.assert_close(out, separate(ls, x), rtol=0, atol=1e-6)
            # The layers' parameters are now views of the packed weight: no second copy.
            assert ls[1].weight.untyped_storage().data_ptr() == packed._weight.untyped_storage().data_ptr()


def test_in_place_update_and_replacement_are_seen():
    ls = layers(True)
    packed, x = PackedLinear(*ls), torch.randn(5, 8)
    with torch.no_grad():
        packed(x)
        ls[2].weight.mul_(3)                                   # optimizer-style in-place step
        torch.testing.assert_close(packed(x), separate(ls, x), rtol=0, atol=1e-6)
        ls[0].load_state_dict({"weight": torch.ones(8, 8), "bias": torch.zeros(8)}, assign=True)
        torch.testing.assert_close(packed(x), separate(ls, x), rtol=0, atol=1e-6)


def test_gradients_reach_each_layer():
    ls = layers(False)
    packed = PackedLinear(*ls)
    with torch.no_grad():
        packed(torch.randn(1, 8))                              # pack first: params become views
    packed(torch.randn(4, 8)).sum().backward()
    assert all(l.weight.grad is not None and l.weight.grad.abs().sum() > 0 for l in ls)


def test_an_optimizer_built_before_packing_still_trains_what_inference_reads():
    """Packing keeps the Parameter objects (only their data moves into the pack)."""
    torch.manual_seed(0)
    q, k = torch.nn.Linear(8, 4), torch.nn.Linear(8, 6)
    params_before = [q.weight, q.bias, k.weight, k.bias]
    opt = torch.optim.SGD(params_before, lr=0.1)
    pack = PackedLinear(q, k)
    x = torch.randn(3, 8)
    with torch.no_grad():
        pack(x)                                            # first inference packs
    assert all(a is b for a, b in zip([q.weight, q.bias, k.weight, k.bias], params_before))
    (q(x).sum() + k(x).sum()).backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(pack(x), torch.cat([q(x), k(x)], dim=-1))
