"""Drafter weights: the verifier's own, a bf16 copy, or weight-only int8 / int4 copies.

The verifier decides every token, so the drafter's weights never change an output (lossless);
they change only acceptance and the drafter's cost. Decoding a small batch is bound by reading
weights, so fewer bytes per weight make a drafter step cheaper.

- "same": the verifier's model object (no copy, no extra memory).
- "bf16": a bf16 copy; its KV cache is bf16 too (caches follow `model.dtype`).
- "int8": bf16 activations; every decoder Linear (q/k/v, o, gate/up, down) and the LM head hold
  int8 weights with one scale per output channel, run by `torch._weight_int8pack_mm`.
- "int4": the same with group-wise int4 (32 inputs per group, a scale and a zero each), run by
  `torch._weight_int4pack_mm_for_cpu`. A Q4_1 GGUF source (group-32 scale + min) fits this format
  exactly but for the kernel's bf16 scale and zero: SmolLM2-135M's decoder weights come back within
  0.029 (mean 0.0013; bf16 weights: 0.014, int8: 0.036), fp32 scale and zero would give 0. Its
  embedding (and so the tied head) is Q8_0, which int4 does not fit (max error 0.089).

The embedding stays a bf16 table in every copy; a head tied to it gets its own quantized copy.
The quantized kernels are PyTorch's CPU kernels, and they are fast only with bf16 activations:
int8 / int4 need a CPU model.

Quantized layers replace `Attention._packed` / `MLP._packed` (the q/k/v and gate/up
`PackedLinear`s) with one quantized matmul over the stacked rows, and `o_proj`, `down_proj` and
`lm_head` with their own; the fp32 layers they replace are dropped from the copy.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsespec.errors import InvalidArgument
from sparsespec.models.llama import LlamaModel, RMSNorm

DRAFTER_WEIGHTS = ("same", "bf16", "int8", "int4")
INT4_GROUP = 32
_INT4_ROWS = 16  # the int4 CPU pack needs a multiple of 16 output rows (padded with zero rows)


def drafter_weights(model: LlamaModel, weights: str) -> LlamaModel:
    """The drafter model for `weights` (one of DRAFTER_WEIGHTS), built from `model`'s weights.

    Works on any LlamaModel, a `layers:N` view (truncate.layer_truncated) included. The copies
    are in eval mode with no gradients; `model` itself is never changed.
    """
    check_drafter_weights(weights)
    if weights == "same":
        return model
    if weights == "bf16":
        return _cast_copy(model, torch.bfloat16)
    if model.device.type != "cpu":
        raise InvalidArgument("drafter_weights", f"{weights} uses PyTorch's CPU kernels; the model is on "
                                                 f"{model.device}")
    return _quantized_copy(model, Int8Linear if weights == "int8" else Int4Linear)


def check_drafter_weights(weights: str) -> None:
    if weights not in DRAFTER_WEIGHTS:
        raise InvalidArgument("drafter_weights", f"unknown value {weights!r}; known: {', '.join(DRAFTER_WEIGHTS)}")


def weight_bytes(model: nn.Module) -> int:
    """Exact bytes of the weights `model` reads: parameters and buffers (quantized tensors, their
    scales and zeros), each tensor once (a tied head is its embedding)."""
    seen: set[tuple[int, int, torch.dtype]] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


class Int8Linear(nn.Module):
    """Weight-only int8 Linear: w ~ q * scale with q int8 [N, K] and one bf16 scale per output
    row; bf16 activations (the kernel's fast path on a CPU)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        w = weight.detach().float()                                              # [N, K]
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).to(torch.bfloat16)  # [N]
        q = torch.round(w / scale.float()[:, None]).clamp_(-128, 127).to(torch.int8)
        self.out_features, self.in_features = w.shape
        self.register_buffer("qweight", q)                                       # [N, K] int8
        self.register_buffer("scales", scale)                                    # [N] bf16
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N] bf16."""
        lead = x.shape[:-1]
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous(),
                                      self.qweight, self.scales)                 # [M, N]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight [N, K] this layer multiplies by (for error measurements)."""
        return self.qweight.float() * self.scales.float()[:, None]


class Int4Linear(nn.Module):
    """Weight-only int4 Linear, asymmetric per group of INT4_GROUP inputs:
    w ~ (q - 8) * scale + zero with q in [0, 15]; scale and zero bf16; bf16 activations.

    Scale = (max - min) / 15 and zero = min + 8 * scale per group, so a group that was quantized
    as Q4_1 (w = d * q + m) comes back with its own d and m, up to rounding them to bf16.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group: int = INT4_GROUP):
        super().__init__()
        n, k = weight.shape
        q, scale, zero = int4_quantize(weight, group)                           # [N', K], [N', K/G] x2
        q = q.view(q.shape[0], k)
        self.out_features, self.in_features, self.group = n, k, group
        self.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(q, 1))  # [N', K/2] uint8
        # [K/G, N', 2]: (scale, zero) per group and row, the kernel's layout
        self.register_buffer("scale_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N] bf16."""
        lead = x.shape[:-1]
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous(),
                                              self.qweight, self.group, self.scale_zeros)  # [M, N']
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight [N, K] this layer multiplies by, read back from the packed tensor: the
        kernel applied to the identity with fp32 activations, which is exact (and slow)."""
        eye = torch.eye(self.in_features)
        w = torch._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group, self.scale_zeros.float())  # [K, N']
        return w[:, :self.out_features].t().contiguous()


def int4_quantize(weight: torch.Tensor, group: int = INT4_GROUP):
    """weight [N, K] -> (q [N', K/G, G] int32 in [0, 15], scale and zero [N', K/G] bf16), rows
    padded with zeros to N' (a multiple of 16); w ~ (q - 8) * scale + zero."""
    w = weight.detach().float()                                                  # [N, K]
    n, k = w.shape
    if k % group:
        raise InvalidArgument("drafter_weights", f"int4 needs input sizes divisible by {group}, got {k}")
    pad = -n % _INT4_ROWS
    if pad:
        w = torch.cat([w, w.new_zeros(pad, k)])                                  # [N', K]
    wg = w.view(w.shape[0], k // group, group)                                   # [N', K/G, G]
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)                                    # [N', K/G]
    scale = ((hi - lo) / 15).clamp_min(1e-12).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    # q from the bf16 scale and zero the kernel will use: the nearest weight it can represent.
    q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp_(0, 15)
    return q.to(torch.int32), scale, zero


def _meta_like(model: LlamaModel) -> LlamaModel:
    """An empty model like `model`, with its K/V source (LlamaModel.kv_source): a weight copy of
    the verifier is still fed the verifier's K/V."""
    source = model.kv_source
    with torch.device("meta"):
        new = type(model)(model.cfg, model.max_context)  # LlamaModel or Gemma3Model
    new._kv_source = source
    return new


def _cast_copy(model: LlamaModel, dtype: torch.dtype) -> LlamaModel:
    """An independent copy of `model` in `dtype`; a tied head stays tied (one tensor)."""
    new = _meta_like(model)
    copies: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) not in copies:
                copies[id(p)] = nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False)
            owner, _, leaf = name.rpartition(".")
            new.get_submodule(owner)._parameters[leaf] = copies[id(p)]
    return new.eval()


def _quantized_copy(model: LlamaModel, linear: type[nn.Module]) -> LlamaModel:
    """bf16 embedding and norms; every matmul `linear` (the stacked groups as one)."""
    new = _meta_like(model)
    with torch.no_grad():
        new.embed_tokens.weight = _bf16(model.embed_tokens.weight)
        for name, mod in model.named_modules():         # every norm (Gemma 3: four per block, q/k norms)
            if isinstance(mod, RMSNorm):
                new.get_submodule(name).weight = _bf16(mod.weight)
        new.lm_head = linear(model.lm_head.weight)       # its own copy even when tied to the embedding
        for src, dst in zip(model.layers, new.layers):
            a, m = src.self_attn, src.mlp
            dst.self_attn._packed = _stacked(linear, a.q_proj, a.k_proj, a.v_proj)   # [(H+2Hkv)*D, C]
            dst.self_attn.o_proj = linear(a.o_proj.weight)
            dst.mlp._packed = _stacked(linear, m.gate_proj, m.up_proj)                # [2I, C]
            dst.mlp.down_proj = linear(m.down_proj.weight)
            for gone in ("q_proj", "k_proj", "v_proj"):    # the pack replaces them
                delattr(dst.self_attn, gone)
            for gone in ("gate_proj", "up_proj"):
                delattr(dst.mlp, gone)
    return new.eval()


def _bf16(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().to(torch.bfloat16, copy=True), requires_grad=False)


def _stacked(linear: type[nn.Module], *layers: nn.Linear) -> nn.Module:
    """One quantized matmul for layers on the same input: PackedLinear's contract (x -> the
    outputs concatenated), and per-row (int8) or per-row-group (int4) quantization is the same
    stacked or not."""
    weight = torch.cat([l.weight.detach() for l in layers])
    bias = torch.cat([l.bias.detach() for l in layers]) if layers[0].bias is not None else None
    return linear(weight, bias)
