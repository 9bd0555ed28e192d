"""Rotary position embeddings for the Llama family: default, linear, dynamic NTK, YaRN, llama3.

The frequencies are a pure function of the config (and, for dynamic NTK, of the context length
the model is served at), so a k-token verify and a 1-token decode rotate identically.
"""

from __future__ import annotations

import math

import torch

from sparsespec.models.config import ModelConfig


def rope_frequencies(cfg: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [head_dim/2] float32, attention_scaling).

    seq_len only matters for dynamic NTK, where it is the context length the model serves.
    """
    dim = cfg.head_dim
    base = cfg.rope_theta
    sc = cfg.rope_scaling or {}
    rope_type = cfg.rope_type
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim

    if rope_type == "default":
        return 1.0 / (base ** exponents), 1.0
    if rope_type == "linear":
        return 1.0 / (base ** exponents) / float(sc["factor"]), 1.0
    if rope_type == "dynamic":
        return _dynamic_ntk(cfg, sc, exponents, seq_len), 1.0
    if rope_type == "yarn":
        return _yarn(cfg, sc, exponents)
    if rope_type == "llama3":
        return _llama3(sc, 1.0 / (base ** exponents)), 1.0
    raise AssertionError(rope_type)  # ModelConfig validated rope_type


def _dynamic_ntk(cfg, sc, exponents, seq_len):
    factor = float(sc["factor"])
    max_pos = int(sc.get("original_max_position_embeddings") or cfg.max_position_embeddings)
    seq_len = max(seq_len or max_pos, max_pos)
    dim = cfg.head_dim
    base = cfg.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** exponents)


def _yarn(cfg, sc, exponents):
    factor = float(sc["factor"])
    dim = cfg.head_dim
    base = cfg.rope_theta
    original = int(sc.get("original_max_position_embeddings") or cfg.max_position_embeddings)
    mscale, mscale_all_dim = sc.get("mscale"), sc.get("mscale_all_dim")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = sc.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = float(sc.get("beta_fast") or 32)
    beta_slow = float(sc.get("beta_slow") or 1)
    truncate = sc.get("truncate", True)

    def correction_dim(num_rotations):
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** exponents
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


def _llama3(sc, inv_freq):
    factor = float(sc["factor"])
    low_freq_factor = float(sc["low_freq_factor"])
    high_freq_factor = float(sc["high_freq_factor"])
    old_len = int(sc["original_max_position_embeddings"])
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryTable:
    """Precomputed cos/sin for positions [0, max_len); gathered per token by position."""

    def __init__(self, cfg: ModelConfig, max_len: int, device, dtype, serve_len: int | None = None):
        inv_freq, scaling = rope_frequencies(cfg, serve_len or max_len)
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)                       # [L, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)                # [L, D]
        self.cos = (emb.cos() * scaling).to(device=device, dtype=dtype)
        self.sin = (emb.sin() * scaling).to(device=device, dtype=dtype)
        self.max_len = max_len

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, D] ready to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D] -> rotated x (half-split convention, as Hugging Face Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
