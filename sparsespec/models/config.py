"""ModelConfig: the one description of a Llama-family model, validated at construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sparsespec.errors import ModelLoadError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
MODEL_TYPES = ("llama", "mistral", "qwen2")


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

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer: the sliding window W of a local attention layer (the query at p sees keys
        (p - W, p]), None for a global one. The caches read this; Llama-family layers are global."""
        return (None,) * self.num_layers

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V for one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def truncated(self, num_layers: int) -> "ModelConfig":
        """The config of a layer-truncated copy (the `layers:N` drafter)."""
        d = asdict(self)
        d["num_layers"] = num_layers
        return ModelConfig(**d)

    # --- Hugging Face config.json <-> ModelConfig -------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        try:
            model_type = hf.get("model_type", "llama")
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

    def to_hf(self) -> dict[str, Any]:
        archs = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        out = {
            "architectures": [archs[self.model_type]],
            "model_type": self.model_type,
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
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        if self.model_type == "mistral":
            out["sliding_window"] = None
        return out
