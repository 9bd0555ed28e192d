"""A compact Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2).

Attention goes through the KV cache (kvstore.cache.base.KVCache), so the same model serves as the
verifier over a FullKVCache and as the drafter over a SparseKVCache.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvstore.cache.base import KVCache
from sparsespec.kernels.linear import Linear
from sparsespec.models.config import ModelConfig
from sparsespec.models.packed import PackedLinear
from sparsespec.models.rope import RotaryTable, apply_rotary

POSITION_SLACK = 80  # > the largest draft length (64) + 1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[-1],)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, shape, self.weight, self.eps)                   # one fused op
        # Half precision: normalise in fp32 as Hugging Face does, cast back, then scale.
        return self.weight * F.rms_norm(x.float(), shape, None, self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

        self._packed = PackedLinear(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x, cos, sin, cache: KVCache):
        b, t, _ = x.shape                                                        # x: [B, T, C]
        h, hkv = self.num_heads, self.num_kv_heads
        qkv = self._packed(x).view(b, t, h + 2 * hkv, self.head_dim).transpose(1, 2)  # [B, H+2Hkv, T, D]
        qk = apply_rotary(qkv[:, :h + hkv], cos, sin)                            # q and k in one pass
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + hkv:]                         # [B, H|Hkv|Hkv, T, D]
        out = cache.attend(self.layer, q, k, v)                                  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU by default, GeGLU for Gemma 3."""

    def __init__(self, cfg: ModelConfig, act=F.silu):
        super().__init__()
        self.act = act
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self._packed = PackedLinear(self.gate_proj, self.up_proj)

    def forward(self, x):
        gate, up = self._packed(x).chunk(2, dim=-1)                              # [B, T, I] each
        return self.down_proj(self.act(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Parameter names follow Hugging Face (minus the `model.` prefix) so checkpoints map 1:1."""

    def __init__(self, cfg: ModelConfig, max_context: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.max_context = max_context or cfg.max_position_embeddings
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._rotary: RotaryTable | None = None
        self._kv_source: str | None = None

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def kv_source(self) -> str:
        """The identity of the weights this model's K/V come from: a hash of what layer 0's K/V
        depend on (embedding, k/v projections, rotary settings). A `layers:N` cut or a
        --drafter-weights copy keeps its source's, so the verifier knows it may feed that drafter
        its own K/V (kvstore/cache/feed.py); a separately trained drafter has its own. Hashed at
        bf16 precision, so the same weights loaded as fp32 on one side and bf16 on the other agree."""
        if self._kv_source is None:
            attn, cfg = self.layers[0].self_attn, self.cfg
            h = hashlib.sha256(repr((cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)).encode())
            for t in (self.embed_tokens.weight[:256], attn.k_proj.weight, attn.v_proj.weight):
                h.update(t.detach().to(torch.bfloat16).float().cpu().contiguous().numpy().tobytes())
            self._kv_source = h.hexdigest()[:16]
        return self._kv_source

    def rotary(self) -> RotaryTable:
        r = self._rotary
        if r is None or r.cos.device != self.device or r.cos.dtype != self.dtype:
            # Room past the context limit for batch padding of a last round's drafts (never kept).
            r = self._rotary = RotaryTable(self.cfg, self.max_context + POSITION_SLACK, self.device,
                                           self.dtype, serve_len=self.max_context)
        return r

    def forward(self, input_ids: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """input_ids: [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only), float32.

        Appends the T tokens to `cache`.
        """
        positions = cache.begin_forward(input_ids.shape[1])                     # [B, T]
        cos, sin = self.rotary()(positions)                                      # [B, 1, T, D]
        x = self.embed_tokens(input_ids)                                          # [B, T, C]
        for block in self.layers:
            x = block(x, cos, sin, cache)
        cache.end_forward()
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()
