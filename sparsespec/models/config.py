"""ModelConfig: the one description of a model (the Llama family, Gemma 3), validated at construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sparsespec.errors import ModelLoadError
from sparsespec.kernels.attention import MAX_BLOCK

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma3")
# Gemma 3's per-layer attention kinds, as Hugging Face names them (config.layer_types).
SLIDING, FULL = "sliding_attention", "full_attention"
LAYER_TYPES = (SLIDING, FULL)
HIDDEN_ACTS = {"llama": ("silu",), "mistral": ("silu",), "qwen2": ("silu",), "gemma3": ("gelu_pytorch_tanh",)}
# What Hugging Face's Gemma3TextConfig assumes when a config.json leaves a field out.
GEMMA3_DEFAULTS = {"rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "query_pre_attn_scalar": 256,
                   "sliding_window": 4096, "sliding_window_pattern": 6, "max_position_embeddings": 131_072,
                   "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "vocab_size": 262_208}


def ring_block(window: int) -> int:
    """SB of a local layer's ring in a FullKVCache: the most new tokens one pass over the ring
    attends (a longer forward goes in sub-blocks of SB); a rollback of up to SB - 1 positions
    is exact. max(MAX_BLOCK, W) + 1: a verify (k + 1 <= MAX_BLOCK) is one pass and rolls back
    exactly even to its start, and a prefill chunk of 2048 is 4 passes at W = 512 (R = 1024)."""
    return max(MAX_BLOCK, window) + 1


def ring_slots(window: int, capacity: int | None, block: int | None = None) -> int:
    """Slots R of a local layer (window W) in a FullKVCache of `capacity` tokens: R = W - 1 + SB
    (position p in slot p % R), clamped to the capacity (None: unbounded)."""
    r = window - 1 + (ring_block(window) if block is None else block)
    return r if capacity is None else min(r, capacity)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Hugging Face style rope_scaling dict ({"rope_type": "yarn", "factor": ...}); None = default.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Gemma 3 (None / unused for the Llama family):
    hidden_act: str = "silu"
    sliding_window: int | None = None            # W of the local layers
    layer_types: tuple[str, ...] | None = None   # per layer: SLIDING (local) or FULL (global)
    rope_local_base_freq: float | None = None    # rope base of the local layers (global: rope_theta + rope_scaling)
    query_pre_attn_scalar: float | None = None   # attention scale = query_pre_attn_scalar ** -0.5

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, name)) < 1:
                raise ModelLoadError(f"config.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"config.num_heads ({self.num_heads}) must be a multiple of "
                                 f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ModelLoadError(f"config.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.model_type not in MODEL_TYPES:
            raise ModelLoadError(f"config.model_type {self.model_type!r} is not one of {MODEL_TYPES}")
        if self.rope_type not in ROPE_TYPES:
            raise ModelLoadError(f"config.rope_scaling.rope_type {self.rope_type!r} is not one of {ROPE_TYPES}")
        if self.hidden_act not in HIDDEN_ACTS[self.model_type]:
            raise ModelLoadError(f"config.hidden_act {self.hidden_act!r} is not supported for {self.model_type} "
                                 f"(supported: {', '.join(HIDDEN_ACTS[self.model_type])})")
        if self.model_type == "gemma3":
            self._check_gemma3()
        else:
            for name in ("sliding_window", "layer_types", "rope_local_base_freq", "query_pre_attn_scalar"):
                if getattr(self, name) is not None:
                    raise ModelLoadError(f"config.{name} is a Gemma 3 field; {self.model_type} does not take it")

    def _check_gemma3(self):
        w = self.sliding_window
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ModelLoadError(f"config.sliding_window must be an integer >= 1 for gemma3, got {w!r}")
        types = self.layer_types
        if not isinstance(types, tuple) or len(types) != self.num_layers:
            raise ModelLoadError(f"config.layer_types must name each of the {self.num_layers} layers, got {types!r}")
        bad = [t for t in types if t not in LAYER_TYPES]
        if bad:
            raise ModelLoadError(f"config.layer_types: {bad[0]!r} is not one of {LAYER_TYPES}")
        for name in ("rope_local_base_freq", "query_pre_attn_scalar"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ModelLoadError(f"config.{name} must be a positive number for gemma3, got {v!r}")
        if self.attention_bias:
            raise ModelLoadError("config.attention_bias: gemma3 with q/k/v/o biases is not supported")

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer, the sliding window W of a local layer (the query at position p sees the keys
        j with p - W < j <= p, as transformers' Gemma 3 mask) or None for a global layer (every
        key j <= p). All None for the Llama family."""
        if self.layer_types is None:
            return (None,) * self.num_layers
        return tuple(self.sliding_window if t == SLIDING else None for t in self.layer_types)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V for one token across all layers (every layer keeping it: a cache
        with local layers keeps less, see `kv_bytes`)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def kv_slots(self, capacity: int | None) -> tuple[int, ...]:
        """Per layer, the entries a FullKVCache of `capacity` tokens (None: unbounded) keeps per
        row: the capacity on a global layer, a local layer's ring (`ring_slots`)."""
        return tuple(capacity if w is None else ring_slots(w, capacity) for w in self.layer_windows)

    def kv_bytes(self, tokens: int, dtype_bytes: int, capacity: int | None = None) -> int:
        """Bytes of K and V a FullKVCache row holding `tokens` entries keeps: every token on a
        global layer, at most its ring on a local one (tokens x kv_bytes_per_token for Llama)."""
        per_entry = 2 * self.num_kv_heads * self.head_dim * dtype_bytes
        return per_entry * sum(tokens if s is None else min(tokens, s) for s in self.kv_slots(capacity))

    def truncated(self, num_layers: int) -> "ModelConfig":
        """The config of a layer-truncated copy (the `layers:N` drafter)."""
        d = asdict(self)
        d["num_layers"] = num_layers
        if self.layer_types is not None:
            d["layer_types"] = self.layer_types[:num_layers]
        return ModelConfig(**d)

    # --- Hugging Face config.json <-> ModelConfig -------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        model_type = hf.get("model_type", "llama")
        if model_type in ("gemma3", "gemma3_text"):
            return cls._gemma3_from_hf(hf)
        try:
            heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            rope_scaling = hf.get("rope_scaling")
            rope_theta = hf.get("rope_theta")
            params = hf.get("rope_parameters")  # transformers >= 5 folds theta + scaling here
            if params:
                rope_theta = params.get("rope_theta", rope_theta)
                if params.get("rope_type", "default") != "default":
                    rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
                rope_scaling=dict(rope_scaling) if rope_scaling else None,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
                model_type=model_type,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks required field {e.args[0]!r}") from None

    @classmethod
    def _gemma3_from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Gemma3TextConfig (`gemma3_text`), or the text part of a multimodal `gemma3` config."""
        if hf.get("model_type") == "gemma3":
            text = hf.get("text_config")
            if not isinstance(text, dict):
                raise ModelLoadError("config.text_config: a gemma3 config must carry its text model's config")
            top = {k: hf[k] for k in ("bos_token_id", "eos_token_id") if k in hf}
            hf = {**top, **text}
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            if hf.get(name) is not None:
                raise ModelLoadError(f"config.{name}: logit soft-capping (Gemma 2) is not supported")
        if hf.get("use_bidirectional_attention"):
            raise ModelLoadError("config.use_bidirectional_attention: only causal Gemma 3 is supported")
        d = {**GEMMA3_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
        try:
            num_layers = int(hf["num_hidden_layers"])
            heads = int(hf["num_attention_heads"])
            rope_theta, local_base = d["rope_theta"], d["rope_local_base_freq"]
            rope_scaling = hf.get("rope_scaling")
            params = hf.get("rope_parameters")  # transformers >= 5: {"full_attention": {...}, "sliding_attention": {...}}
            if params:
                glob, local = params.get(FULL, params), params.get(SLIDING, {})
                rope_theta = glob.get("rope_theta", rope_theta)
                local_base = local.get("rope_theta", local_base)
                if local.get("rope_type", "default") != "default":
                    raise ModelLoadError("config.rope_parameters.sliding_attention: only the default rope "
                                         "is supported on local layers")
                rope_scaling = {k: v for k, v in glob.items() if k != "rope_theta"} \
                    if glob.get("rope_type", "default") != "default" else None
            types = hf.get("layer_types")
            if types is None:
                pattern = int(d["sliding_window_pattern"])
                types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=num_layers,
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(d["head_dim"]),
                max_position_embeddings=int(d["max_position_embeddings"]),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                rope_scaling=dict(rope_scaling) if rope_scaling else None,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
                attention_bias=bool(hf.get("attention_bias", False)),
                model_type="gemma3",
                bos_token_id=hf.get("bos_token_id", 2),
                eos_token_ids=eos_ids,
                hidden_act=str(hf.get("hidden_activation") or hf.get("hidden_act") or d["hidden_activation"]),
                sliding_window=int(d["sliding_window"]),
                layer_types=tuple(types),
                rope_local_base_freq=float(local_base),
                query_pre_attn_scalar=d["query_pre_attn_scalar"],
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks required field {e.args[0]!r}") from None

    def to_hf(self) -> dict[str, Any]:
        """config.json in Hugging Face's names: the fields every family shares, then its own."""
        archs = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gemma3": "Gemma3ForCausalLM"}
        out = {
            "architectures": [archs[self.model_type]],
            "model_type": "gemma3_text" if self.model_type == "gemma3" else self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        if self.model_type == "gemma3":
            out.update({
                "rope_local_base_freq": self.rope_local_base_freq,
                "hidden_activation": self.hidden_act,
                "query_pre_attn_scalar": self.query_pre_attn_scalar,
                "sliding_window": self.sliding_window,
                "layer_types": list(self.layer_types),
                "final_logit_softcapping": None,
                "attn_logit_softcapping": None,
            })
        else:
            out["hidden_act"] = self.hidden_act
        if self.model_type == "mistral":
            out["sliding_window"] = None
        return out
