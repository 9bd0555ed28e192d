"""Gemma 3 text models (Gemma3ForCausalLM; the text part of the multimodal ones).

What differs from Llama (llama.py), all of it as Hugging Face computes it:
- layers are local (sliding window W: the query at position p sees keys p - W < j <= p) or global
  (`cfg.layer_types`; `cfg.layer_windows` is what the caches read). The model hands every layer's
  q/k/v to `cache.attend` as Llama does; applying the window is the cache's business.
- local layers rotate with base `rope_local_base_freq` and no scaling, global ones with
  `rope_theta` and `rope_scaling`; keys are cached rotated, as for Llama.
- q and k are RMS-normalised over head_dim (q_norm, k_norm) before the rotation.
- four norms per block: input, post_attention (on the attention output, before the residual
  add), pre_feedforward, post_feedforward.
- GeGLU MLP: gelu(gate, tanh approximation) * up.
- the embedding is scaled by sqrt(hidden_size), the scale cast to the weight's dtype first.
- attention scale query_pre_attn_scalar ** -0.5 (see Gemma3Attention).
- the head is tied to the embedding.

Norm weights: Gemma's RMSNorm multiplies by (1 + w) in fp32. We store 1 + w (llama.cpp's GGUF
convention too), so the loader adds 1 to a Hugging Face checkpoint's norm weights and save_model
subtracts it (`NORM_OFFSET`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvstore.cache.base import KVCache
from sparsespec.kernels.linear import Linear
from sparsespec.models.config import SLIDING, ModelConfig
from sparsespec.models.llama import MLP, POSITION_SLACK, LlamaModel, RMSNorm
from sparsespec.models.packed import PackedLinear
from sparsespec.models.rope import RotaryTable, apply_rotary

NORM_OFFSET = 1.0  # stored norm weight = Hugging Face's Gemma norm weight + NORM_OFFSET


def is_norm_weight(name: str) -> bool:
    """The parameters stored with NORM_OFFSET (every RMSNorm's weight, q_norm and k_norm too)."""
    return name.endswith("norm.weight")


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * weight with weight = 1 + w stored; in half precision the product is taken in
    fp32 and then cast (Gemma's order; Llama casts first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[-1],)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, shape, self.weight, self.eps)
        return (F.rms_norm(x.float(), shape, None, self.eps) * self.weight.float()).to(x.dtype)


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.local = cfg.layer_types[layer] == SLIDING
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        # Our attention kernels scale scores by head_dim ** -0.5; Gemma scales by
        # query_pre_attn_scalar ** -0.5. Pre-scaling q by sqrt(head_dim / query_pre_attn_scalar)
        # gives Gemma's scores. The factor is 1 (no multiply, so exact) when the two are equal, as
        # in the 270M (both 256) and most of the family; otherwise it differs from scaling the
        # scores by an fp rounding of q.
        ratio = cfg.head_dim / float(cfg.query_pre_attn_scalar)
        self.q_scale = None if ratio == 1.0 else ratio ** 0.5
        self._packed = PackedLinear(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x, rotary, cache: KVCache):
        b, t, _ = x.shape                                                        # x: [B, T, C]
        h, hkv = self.num_heads, self.num_kv_heads
        qkv = self._packed(x).view(b, t, h + 2 * hkv, self.head_dim).transpose(1, 2)  # [B, H+2Hkv, T, D]
        cos, sin = rotary[1 if self.local else 0]
        q = apply_rotary(self.q_norm(qkv[:, :h]), cos, sin)                     # [B, H, T, D]
        k = apply_rotary(self.k_norm(qkv[:, h:h + hkv]), cos, sin)              # [B, Hkv, T, D]
        v = qkv[:, h + hkv:]
        if self.q_scale is not None:
            q = q * self.q_scale
        out = cache.attend(self.layer, q, k, v)                                  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Gemma3Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.self_attn = Gemma3Attention(cfg, layer)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.mlp = MLP(cfg, act=functools.partial(F.gelu, approximate="tanh"))
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)

    def forward(self, x, rotary, cache):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rotary, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(LlamaModel):
    """The LlamaModel interface (forward(ids, cache, last_only), cfg, max_context, device, dtype,
    kv_source, layers[i].self_attn.k_proj/v_proj, embed_tokens, norm, lm_head) over Gemma 3
    blocks. Parameter names follow Hugging Face's Gemma3ForCausalLM (minus `model.`)."""

    def __init__(self, cfg: ModelConfig, max_context: int | None = None):
        nn.Module.__init__(self)
        if cfg.model_type != "gemma3":
            raise ValueError(f"Gemma3Model needs a gemma3 config, got {cfg.model_type!r}")
        self.cfg = cfg
        self.max_context = max_context or cfg.max_position_embeddings
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Gemma3Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._rotary: tuple[RotaryTable, RotaryTable] | None = None
        self._kv_source: str | None = None

    @property
    def kv_source(self) -> str:
        """As LlamaModel.kv_source, over what layer 0's K/V depend on here: the embedding (and its
        scale), k/v projections, k_norm, and layer 0's rope (local or global) and window."""
        if self._kv_source is None:
            attn, cfg = self.layers[0].self_attn, self.cfg
            rope = (cfg.rope_local_base_freq, None) if attn.local else (cfg.rope_theta, cfg.rope_scaling)
            h = hashlib.sha256(repr(("gemma3", cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, rope,
                                     cfg.layer_windows[0], cfg.rms_norm_eps)).encode())
            for t in (self.embed_tokens.weight[:256], attn.k_proj.weight, attn.v_proj.weight,
                      attn.k_norm.weight, self.layers[0].input_layernorm.weight):
                h.update(t.detach().to(torch.bfloat16).float().cpu().contiguous().numpy().tobytes())
            self._kv_source = h.hexdigest()[:16]
        return self._kv_source

    def rotary(self) -> tuple[RotaryTable, RotaryTable]:
        """(global, local) rotary tables."""
        r = self._rotary
        if r is None or r[0].cos.device != self.device or r[0].cos.dtype != self.dtype:
            n, cfg = self.max_context + POSITION_SLACK, self.cfg
            local = dataclasses.replace(cfg, rope_theta=float(cfg.rope_local_base_freq), rope_scaling=None)
            r = self._rotary = (RotaryTable(cfg, n, self.device, self.dtype, serve_len=self.max_context),
                                RotaryTable(local, n, self.device, self.dtype, serve_len=self.max_context))
        return r

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight
        return self.embed_tokens(input_ids) * torch.tensor(self.cfg.hidden_size ** 0.5).to(w.dtype)

    def forward(self, input_ids: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """input_ids: [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only), float32.

        Appends the T tokens to `cache`.
        """
        positions = cache.begin_forward(input_ids.shape[1])                     # [B, T]
        glob, local = self.rotary()
        rotary = (glob(positions), local(positions))                             # (cos, sin) [B, 1, T, D] each
        x = self.embed(input_ids)                                                # [B, T, C]
        for block in self.layers:
            x = block(x, rotary, cache)
        cache.end_forward()
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()


def model_class(cfg: ModelConfig) -> type[LlamaModel]:
    """The model class for a config: Gemma3Model for gemma3, LlamaModel for the Llama family."""
    return Gemma3Model if cfg.model_type == "gemma3" else LlamaModel


def new_model(cfg: ModelConfig, max_context: int | None = None) -> LlamaModel:
    return model_class(cfg)(cfg, max_context)
