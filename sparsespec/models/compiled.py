"""A compiled one-token step: the fixed-shape parts of a decode forward under torch.compile.

A drafter's decode step has one shape per batch size (one token per session; the budget is fixed),
so everything but the attention (norms, the q/k/v and MLP matmuls, rotary, the head) can be
compiled once per batch size. The attention stays outside the graph: the cache decides what it
reads (view lengths change every step), and on CUDA it is the Triton kernel anyway.
Forwards of more than one token (a prefill, a sync) run eager.
"""

from __future__ import annotations

import torch

from sparsespec.models.rope import apply_rotary


def _project(block, x, cos, sin):
    """x: [B, 1, C] -> q [B, H, 1, D], k, v [B, Hkv, 1, D] (rotated)."""
    attn = block.self_attn
    b, t, _ = x.shape
    h, hkv = attn.num_heads, attn.num_kv_heads
    qkv = _packed(attn._packed, block.input_layernorm(x)).view(b, t, h + 2 * hkv, attn.head_dim).transpose(1, 2)
    qk = apply_rotary(qkv[:, :h + hkv], cos, sin)
    return qk[:, :h], qk[:, h:], qkv[:, h + hkv:]


def _finish(block, x, out):
    """x: [B, 1, C], out: [B, H, 1, D] (the attention) -> the block's output [B, 1, C]."""
    b, t, _ = x.shape
    x = x + block.self_attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
    mlp = block.mlp
    gate, up = _packed(mlp._packed, block.post_attention_layernorm(x)).chunk(2, dim=-1)
    return x + mlp.down_proj(torch.nn.functional.silu(gate) * up)


def _packed(packed, x):
    """PackedLinear's matmul without its staleness check (data_ptr walks do not trace); the pack is
    made current before compiling (`CompiledStep.__init__`). Quantized packs are Modules."""
    if isinstance(packed, torch.nn.Module):
        return packed(x)
    return torch.nn.functional.linear(x, packed._weight, packed._bias)


def _head(model, x):
    return model.lm_head(model.norm(x)).float()


class CompiledStep:
    """model.forward for T == 1, with `_project`, `_finish` and the head compiled (dynamic=False:
    one graph per batch size, shared by every layer since the layers' parameters are inputs)."""

    def __init__(self, model, backend: str = "inductor"):
        from sparsespec.models.packed import PackedLinear
        self.model = model
        for block in model.layers:                       # make the packs current (eager, once)
            for p in (block.self_attn._packed, block.mlp._packed):
                if isinstance(p, PackedLinear) and not p._is_current():
                    p._pack()
        opts = dict(backend=backend, dynamic=False)
        self.project = torch.compile(_project, **opts)
        self.finish = torch.compile(_finish, **opts)
        self.head = torch.compile(_head, **opts)

    def __call__(self, input_ids: torch.Tensor, cache, last_only: bool = False) -> torch.Tensor:
        model = self.model
        positions = cache.begin_forward(1)                                       # [B, 1]
        cos, sin = model.rotary()(positions)                                     # [B, 1, 1, D]
        x = model.embed_tokens(input_ids)                                        # [B, 1, C]
        for block in model.layers:
            q, k, v = self.project(block, x, cos, sin)
            out = cache.attend(block.self_attn.layer, q, k, v)                   # eager: the cache's
            x = self.finish(block, x, out)
        cache.end_forward()
        return self.head(model, x)
