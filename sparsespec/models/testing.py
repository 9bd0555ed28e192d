"""Tiny real models for tests: a small config, deterministic random weights, a character
tokenizer, and a GGUF writer (so the GGUF path can be tested without a download).

Everything here writes ordinary Hugging Face directories that both load_model and transformers
load, so a test can compare the two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparsespec.models.config import ModelConfig

# Character tokenizer ids (vocab >= 128): 0 <unk>, 1 <s>, 2 </s>, 3..127 the ASCII characters.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def tiny_config(model_type: str = "llama", rope_scaling: dict[str, Any] | None = None,
                **overrides) -> ModelConfig:
    """A small but non-trivial config: GQA (4 query heads over 2 KV heads), 3 layers."""
    fields: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=rope_scaling,
        tie_word_embeddings=False,
        attention_bias=model_type == "qwen2",
        model_type=model_type,
        bos_token_id=BOS_ID,
        eos_token_ids=(EOS_ID,),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_gemma3_config(**overrides) -> ModelConfig:
    """A small Gemma 3: 6 layers, every 3rd global (pattern 3), window 16, GQA (4 query heads over
    2 KV heads), local rope base 10000 and global 1e6 as in the real models, tied head; head_dim
    16 = query_pre_attn_scalar (as in the 270M). Prompts past 2 x 16 tokens cross several windows."""
    from sparsespec.models.config import FULL, SLIDING
    layers = overrides.pop("num_layers", 6)
    pattern = overrides.pop("sliding_window_pattern", 3)
    fields: dict[str, Any] = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=layers, num_heads=4,
        num_kv_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, tie_word_embeddings=True, model_type="gemma3",
        bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,), hidden_act="gelu_pytorch_tanh",
        sliding_window=16, layer_types=tuple(SLIDING if (i + 1) % pattern else FULL for i in range(layers)),
        rope_local_base_freq=10_000.0, query_pre_attn_scalar=16,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def random_model(cfg: ModelConfig, seed: int = 0, std: float | None = None):
    """A model (LlamaModel, or Gemma3Model for a gemma3 config) with deterministic random weights
    (independent of torch's global RNG).

    Matrices ~ N(0, std^2) (std default 0.08, 0.15 when tied); the embedding ~ N(0, 1) and the
    head ~ N(0, 0.25^2), so logits have a spread of ~2 (peaked but not one-hot); norm weights ~ 1 + N(0, 0.1^2), biases
    ~ N(0, 0.1^2). Tied: embedding ~ N(0, 0.1^2) (else the model just repeats its input) and a
    final norm ~ 3x louder (Gemma 3, whose embedding is scaled by sqrt(hidden) and whose blocks
    end in norms: embedding ~ N(0, 0.03^2), final norm ~ 8x). Greedy continuations vary with the
    prompt.
    """
    from sparsespec.models.gemma3 import new_model

    if std is None:
        std = 0.15 if cfg.tie_word_embeddings else 0.08
    g = torch.Generator().manual_seed(seed)
    model = new_model(cfg)
    gemma = cfg.model_type == "gemma3"
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):  # tied head appears once (as the embedding)
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name == "norm.weight" and cfg.tie_word_embeddings:
                loud = 8.0 if gemma else 3.0
                p.copy_(loud * (1.0 + 0.1 * noise))  # the small tied embedding needs a louder head
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            elif name == "embed_tokens.weight":
                p.copy_((0.03 if gemma else 0.1) * noise if cfg.tie_word_embeddings else noise)
            elif name == "lm_head.weight":
                p.copy_(0.25 * noise)
            else:
                p.copy_(std * noise)
    model.eval()
    model.requires_grad_(False)
    return model


def save_random_model(out_dir, cfg: ModelConfig, seed: int = 0, tokenizer: bool = True) -> Path:
    """Write a Hugging Face directory (config.json, model.safetensors and, when the vocabulary
    holds it, the character tokenizer) with deterministic random weights. Returns the path."""
    from sparsespec.models.loader import save_model

    out = save_model(random_model(cfg, seed), out_dir)
    if tokenizer and cfg.vocab_size >= 128:
        char_tokenizer(bos=cfg.model_type == "gemma3").save_pretrained(str(out))
    return out


def char_tokenizer(bos: bool = False):
    """A transformers fast tokenizer over ASCII: one token per character, ids 3..127 = ord(c);
    <unk>=0, <s>=1, </s>=2. Offline, deterministic, round-trips ASCII text exactly. bos=True:
    asked for special tokens it starts a text with <s>, as Gemma's does (SmolLM2's does not)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": UNK_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    vocab.update({chr(i): i for i in range(3, 128)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")


def save_gguf(model, path, qtype: str = "F32", arch: str | None = None) -> Path:
    """Write `model` (a LlamaModel or Gemma3Model) as a llama.cpp-style GGUF file: llama.cpp
    tensor names, q/k rows permuted as convert_hf_to_gguf does for Llama (not for Gemma 3, whose
    norms are written as stored, 1 + w, as llama.cpp does), 2-D weights in `qtype` (F32, F16,
    Q8_0, Q4_0, ...; norms and biases stay F32). No tokenizer metadata. For tests of the GGUF
    path. A Gemma 3 file also carries its sliding_window_pattern (llama.cpp assumes 6 without it)."""
    import gguf
    import numpy as np

    from sparsespec.models.loader import llama_permute

    cfg: ModelConfig = model.cfg
    arch = arch or {"qwen2": "qwen2", "gemma3": "gemma3"}.get(cfg.model_type, "llama")
    qt = gguf.GGMLQuantizationType[qtype]
    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    sc = cfg.rope_scaling or {}
    if cfg.rope_type in ("linear", "yarn"):
        w.add_rope_scaling_type(gguf.RopeScalingType(cfg.rope_type))
        w.add_rope_scaling_factor(float(sc["factor"]))
        if sc.get("original_max_position_embeddings"):
            w.add_rope_scaling_orig_ctx_len(int(sc["original_max_position_embeddings"]))
    elif cfg.rope_type != "default":
        raise ValueError(f"save_gguf: rope type {cfg.rope_type!r} not supported")
    if cfg.bos_token_id is not None:
        w.add_bos_token_id(cfg.bos_token_id)
    if cfg.eos_token_ids:
        w.add_eos_token_id(cfg.eos_token_ids[0])
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
        w.add_array(f"{arch}.attention.sliding_window_pattern", [t == "sliding_attention" for t in cfg.layer_types])
        w.add_float32(f"{arch}.rope.freq_base_swa", float(cfg.rope_local_base_freq))
        w.add_float32(f"{arch}.attention.query_pre_attn_scalar", float(cfg.query_pre_attn_scalar))

    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    if arch == "gemma3":
        layer.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_norm": "attn_q_norm",
                      "self_attn.k_norm": "attn_k_norm"})
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name in names:
            gname = names[name]
        else:
            _, i, rest = name.split(".", 2)
            mod, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{layer[mod]}.{kind}"
        a = t.detach().float().cpu().numpy()
        if arch == "llama" and ".attn_q." in gname:
            a = llama_permute(a, cfg.num_heads)
        elif arch == "llama" and ".attn_k." in gname:
            a = llama_permute(a, cfg.num_kv_heads)
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim == 2 and qt != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
