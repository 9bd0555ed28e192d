"""Load a model (Llama family, Gemma 3) from a Hugging Face directory or a GGUF file; save and convert.

Sources:
- a Hugging Face model directory: config.json + model.safetensors (or a sharded
  model.safetensors.index.json; pytorch_model.bin as a fallback);
- a .gguf file (or a directory holding exactly one .gguf and no config.json), read with our own
  reader over the `gguf` package: metadata -> ModelConfig, tensors dequantized to float32, and
  llama.cpp's q/k row permutation undone (arch llama; llama.cpp does not permute Gemma 3's).

Gemma 3 norm weights are stored as 1 + w (models/gemma3.py): a Hugging Face checkpoint's get 1
added on load and subtracted on save; a GGUF's already hold 1 + w (llama.cpp's convention).

Every problem a user can cause (missing path, corrupt file, unsupported architecture) surfaces as
a one-line ModelLoadError (or InvalidArgument for a bad argument), never a raw traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from sparsespec.errors import InvalidArgument, ModelLoadError
from sparsespec.models.config import FULL, SLIDING, ModelConfig
from sparsespec.models.gemma3 import NORM_OFFSET, is_norm_weight, new_model
from sparsespec.models.llama import LlamaModel

log = logging.getLogger(__name__)

CONVERT_MARKER = "sparsespec-convert.json"  # written last into a converted dir: "this dir is complete"

# Names some checkpoints carry that hold nothing a model needs (old rotary buffers).
_IGNORED_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------

def load_model(path, dtype: torch.dtype = torch.float32, device="cpu", max_context: int | None = None,
               num_layers: int | None = None, progress: bool = False) -> LlamaModel:
    """Load a Llama-family model from a Hugging Face directory or a GGUF file.

    max_context: the longest context the model will serve (rotary table size; dynamic NTK fixes
    its frequencies at this length); default config.max_position_embeddings.
    num_layers: keep only the first N decoder layers (+ final norm + head): the `layers:N` drafter.
    """
    dtype, device = resolve_dtype(dtype), _resolve_device(device)
    kind, p = _classify(path)
    if kind == "gguf":
        with _GGUFFile(p) as g:
            cfg = g.config()
            _validate_num_layers(num_layers, cfg)
            keep = num_layers or cfg.num_layers
            model = _empty_model(cfg.truncated(keep), max_context)
            tensors = g.tensors(num_layers=keep, progress=progress)
            _fill(model, tensors, dtype, device, str(p))
        return model

    raw, cfg = _read_hf_config(p)
    _validate_num_layers(num_layers, cfg)
    keep = num_layers or cfg.num_layers
    max_context = _check_sliding_window(raw, cfg, max_context)
    model = _empty_model(cfg.truncated(keep), max_context)
    tensors = _hf_tensors(p, keep, cfg.num_layers)
    if cfg.model_type == "gemma3":
        tensors = ((n, t + NORM_OFFSET if is_norm_weight(n) else t) for n, t in tensors)
    _fill(model, tensors, dtype, device, str(p))
    return model


def load_tokenizer(path):
    """A transformers tokenizer for a local HF directory or a GGUF file (no network)."""
    kind, p = _classify(path)
    try:
        from transformers import AutoTokenizer
        if kind == "gguf":
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - any tokenizer failure is a load error for the user
        raise ModelLoadError(f"{p}: cannot load a tokenizer: {_one_line(e)}") from None


def load_config(path) -> ModelConfig:
    """The ModelConfig of a model directory or GGUF file, without reading any weights."""
    kind, p = _classify(path)
    if kind == "gguf":
        with _GGUFFile(p) as g:
            return g.config()
    return _read_hf_config(p)[1]


def save_model(model: LlamaModel, out_dir, tokenizer=None) -> Path:
    """Write a Hugging Face format directory (config.json + model.safetensors) that both
    load_model and transformers load. Tied weights are saved once (as the embedding)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    tied = cfg.tie_word_embeddings
    tensors = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        hf_name = name if name == "lm_head.weight" else "model." + name
        if cfg.model_type == "gemma3" and is_norm_weight(name):
            t = t - NORM_OFFSET
        tensors[hf_name] = t.detach().to("cpu").contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf()
    hf["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def convert_gguf_to_dir(gguf_path, out_dir, progress: bool = True, overwrite: bool = False) -> Path:
    """Convert a GGUF file into a Hugging Face directory: config.json, model.safetensors (fp32,
    dequantized, q/k un-permuted), tokenizer files (when the GGUF has tokenizer metadata) and a
    marker file (CONVERT_MARKER, written last).

    Atomic: everything is written to a temporary sibling directory that is renamed into place at
    the end, so an interrupted conversion never leaves a directory that looks complete.
    """
    from safetensors.torch import save_file

    kind, src = _classify(gguf_path)
    if kind != "gguf":
        raise ModelLoadError(f"{src}: not a GGUF file")
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        raise ModelLoadError(f"{out}: already exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        with _GGUFFile(src) as g:
            cfg = g.config()
            has_tokenizer = g.field("tokenizer.ggml.model") is not None
            tensors = {}
            for name, t in g.tensors(num_layers=cfg.num_layers, progress=progress, desc=f"converting {src.name}"):
                tensors[name] = torch.from_numpy(t).contiguous()
            # the same strict check as load_model (names, shapes, nothing missing): no copies
            _fill(_empty_model(cfg, None), tensors.items(), torch.float32, torch.device("cpu"), str(src))
            if cfg.model_type == "gemma3":  # the file holds 1 + w; a Hugging Face directory holds w
                tensors = {n: t - NORM_OFFSET if is_norm_weight(n) else t for n, t in tensors.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        hf = cfg.to_hf()
        hf["torch_dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if has_tokenizer:
            load_tokenizer(src).save_pretrained(str(tmp))
        else:
            log.warning("%s has no tokenizer metadata; the converted directory has no tokenizer", src)
        for f in tmp.iterdir():  # mkdtemp and some writers use 0600/0700; use the usual modes
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        (tmp / CONVERT_MARKER).write_text(json.dumps(
            {"source": src.name, "source_bytes": src.stat().st_size, "format": "hf-safetensors-fp32"}) + "\n")
        if out.exists():  # overwrite=True: move the old one aside first, then swap in
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------------
# Paths and configs
# ------------------------------------------------------------------------------------------------

def _classify(path) -> tuple[str, Path]:
    """-> ("hf", dir) or ("gguf", file); ModelLoadError for anything else."""
    if path is None or str(path) == "":
        raise ModelLoadError("model path is empty")
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model path {p} does not exist")
    if p.is_file():
        if p.suffix.lower() == ".gguf" or _has_gguf_magic(p):
            return "gguf", p
        raise ModelLoadError(f"{p}: not a model directory or a .gguf file")
    if (p / "config.json").is_file():
        return "hf", p
    ggufs = sorted(q for q in p.glob("*.gguf") if q.is_file())
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        raise ModelLoadError(f"{p}: holds {len(ggufs)} .gguf files and no config.json; "
                             f"name one: {', '.join(q.name for q in ggufs)}")
    raise ModelLoadError(f"{p}: no config.json or .gguf file in this directory")


def _has_gguf_magic(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _read_hf_config(d: Path) -> tuple[dict[str, Any], ModelConfig]:
    f = d / "config.json"
    try:
        raw = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{f}: cannot read: {_one_line(e)}") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{f}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{f}: expected a JSON object")
    model_type = raw.get("model_type")
    if model_type is not None and model_type not in HF_MODEL_TYPES:
        raise ModelLoadError(f"{f}: unsupported model_type {model_type!r} (supported: {', '.join(HF_MODEL_TYPES)})")
    act = raw.get("hidden_act", "silu")
    if model_type not in ("gemma3", "gemma3_text") and act not in ("silu", "swish"):
        raise ModelLoadError(f"{f}: unsupported hidden_act {act!r} (only silu)")
    if raw.get("mlp_bias"):
        raise ModelLoadError(f"{f}: mlp_bias=true is not supported")
    try:
        cfg = ModelConfig.from_hf(raw)
    except ModelLoadError as e:
        raise ModelLoadError(f"{f}: {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"{f}: malformed field: {_one_line(e)}") from None
    return raw, cfg


def _check_sliding_window(raw: dict, cfg: ModelConfig, max_context: int | None) -> int | None:
    """Mistral / Qwen2: our attention is full there. That equals a sliding-window model's only
    while the context fits the window: cap the default context there, refuse an explicit longer
    one. (Gemma 3's windows are applied: cfg.layer_windows.)"""
    if cfg.model_type == "gemma3":
        return max_context
    window = raw.get("sliding_window")
    if cfg.model_type == "qwen2" and not raw.get("use_sliding_window", False):
        window = None
    if not window:
        return max_context
    window = int(window)
    if max_context is None:
        if cfg.max_position_embeddings > window:
            log.warning("sliding-window model: serving at most %d tokens of context (the window)", window)
            return window
        return None
    if max_context > window:
        raise InvalidArgument("max_context", f"{max_context} exceeds the model's sliding window ({window}); "
                              "sliding-window attention is not supported")
    return max_context


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    """torch.float32 / "float32" / "fp32" / "bf16" / ... -> a floating torch.dtype."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise InvalidArgument("dtype", f"{dtype!r} is not one of float32, bfloat16, float16")


def _resolve_device(device) -> torch.device:
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InvalidArgument("device", f"{device!r} is not a device ({_one_line(e)})") from None
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise InvalidArgument("device", f"{device!r} is not available on this machine")
    return d


def _validate_num_layers(num_layers, cfg: ModelConfig) -> None:
    if num_layers is None:
        return
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= cfg.num_layers:
        raise InvalidArgument("num_layers", f"must be between 1 and {cfg.num_layers} "
                              f"(the model's layers), got {num_layers!r}")


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    msg = s[0] if s else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# ------------------------------------------------------------------------------------------------
# Filling a model
# ------------------------------------------------------------------------------------------------

def _empty_model(cfg: ModelConfig, max_context: int | None) -> LlamaModel:
    if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int)
                                    or max_context < 1):
        raise InvalidArgument("max_context", f"must be a positive integer, got {max_context!r}")
    # Gemma 3 was trained to max_position_embeddings and its rope has no extrapolation; the Llama
    # family keeps its old freedom (dynamic NTK and YaRN exist to go past the original length).
    if cfg.model_type == "gemma3" and max_context is not None and max_context > cfg.max_position_embeddings:
        raise InvalidArgument("max_context", f"{max_context} exceeds the model's limit "
                                             f"(max_position_embeddings {cfg.max_position_embeddings})")
    with torch.device("meta"):  # no random init: every parameter is assigned from the checkpoint
        return new_model(cfg, max_context=max_context)


def _ours_to_hf(name: str) -> str:
    return name if name == "lm_head.weight" else "model." + name


def _fill(model: LlamaModel, named: Iterable[tuple[str, Any]], dtype, device, source: str) -> None:
    """Assign every parameter from `named` ((HF name, tensor) pairs); strict about missing,
    unexpected and mis-shaped tensors."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = model.cfg.tie_word_embeddings
    expected = set(params) - ({"lm_head.weight"} if tied else set())
    loaded: dict[str, torch.Tensor] = {}
    unexpected = []
    for hf_name, t in named:
        if hf_name == "lm_head.weight":
            if tied:
                continue  # some tied checkpoints also store the head; the embedding wins (as in HF)
            name = hf_name
        elif hf_name.startswith("model.") and hf_name != "model.lm_head.weight":
            name = hf_name[len("model."):]
        else:
            name = None
        if name not in expected:
            unexpected.append(hf_name)
            continue
        if not isinstance(t, torch.Tensor):
            t = torch.from_numpy(t)
        want = tuple(params[name].shape)
        if tuple(t.shape) != want:
            raise ModelLoadError(f"{source}: tensor {_ours_to_hf(name)} has shape {tuple(t.shape)}, expected {want}")
        loaded[name] = t.to(device=device, dtype=dtype)
    missing = sorted(expected - set(loaded))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_names([_ours_to_hf(n) for n in missing])}")
        if unexpected:
            parts.append(f"unexpected tensors {_names(sorted(unexpected))}")
        raise ModelLoadError(f"{source}: " + "; ".join(parts))
    model.load_state_dict(loaded, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    model.eval()
    model.requires_grad_(False)


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _hf_tensors(d: Path, keep_layers: int, total_layers: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of an HF checkpoint, skipping (without reading them)
    the layers keep_layers..total_layers-1 and harmless leftovers. Layers past the config's count
    still come through, so the strict fill reports them."""

    def wanted(hf_name: str) -> str | None:
        if _IGNORED_HF.search(hf_name):
            return None
        m = _LAYER_RE.match(hf_name)
        if m and keep_layers <= int(m.group(1)) < total_layers:
            return None
        return hf_name

    for f in _weight_files(d):
        try:
            if f.suffix == ".safetensors":
                from safetensors import safe_open
                with safe_open(str(f), framework="pt", device="cpu") as sf:
                    for key in sf.keys():
                        name = wanted(key)
                        if name is not None:
                            yield name, sf.get_tensor(key)
            else:
                sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
                for key, t in sd.items():
                    name = wanted(key)
                    if name is not None:
                        yield name, t
        except ModelLoadError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt weight file
            raise ModelLoadError(f"{f}: cannot read weights: {_one_line(e)}") from None


def _weight_files(d: Path) -> list[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (d / single).is_file():
            return [d / single]
        index = d / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except Exception as e:  # noqa: BLE001
                raise ModelLoadError(f"{index}: not a valid index: {_one_line(e)}") from None
            missing = [n for n in files if not (d / n).is_file()]
            if missing:
                raise ModelLoadError(f"{index}: shard files missing: {_names(missing)}")
            return [d / n for n in files]
    raise ModelLoadError(f"{d}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


# ------------------------------------------------------------------------------------------------
# GGUF
# ------------------------------------------------------------------------------------------------

GGUF_ARCHITECTURES = ("llama", "qwen2", "gemma3")
HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma3", "gemma3_text")

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma 3 blocks (llama.cpp's names): four norms, and q/k norms over head_dim.
_GGUF_GEMMA3_LAYER_NAMES = {
    **{k: v for k, v in _GGUF_LAYER_NAMES.items() if not k.startswith("ffn_norm")},
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; None when unknown."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    layer_names = _GGUF_GEMMA3_LAYER_NAMES if arch == "gemma3" else _GGUF_LAYER_NAMES
    m = _GGUF_BLK.match(name)
    if m and m.group(2) in layer_names:
        return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}"
    return None


def llama_permute(w, n_head: int):
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute (HF rotate-half -> interleaved rows)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama_unpermute(w, n_head: int):
    """Inverse of llama_permute."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


class _GGUFFile:
    """A GGUF file opened for reading; every failure becomes a one-line ModelLoadError."""

    def __init__(self, path: Path):
        self.path = path
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise ModelLoadError("reading GGUF files needs the `gguf` package (pip install gguf)") from None
        try:
            from gguf import GGUFReader
            self.reader = GGUFReader(str(path))
        except Exception as e:  # noqa: BLE001 - a corrupt or truncated file
            raise ModelLoadError(f"{path}: not a readable GGUF file ({_one_line(e)})") from None
        size = path.stat().st_size
        for t in self.reader.tensors:  # the reader maps lazily; catch truncation here, up front
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise ModelLoadError(f"{path}: truncated GGUF file (tensor {t.name} ends past the end of the file)")
        self._tensors = {t.name: t for t in self.reader.tensors}
        self._cfg: ModelConfig | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        # Drop our references; the memory map closes once no tensor view refers to it.
        self.reader = None
        self._tensors = {}

    # -- metadata ---------------------------------------------------------------------------

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            v = f.contents()
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"{self.path}: unreadable metadata {key} ({_one_line(e)})") from None
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and f.types and f.types[0].name == "FLOAT32":
            import numpy as np
            v = float(str(np.float32(v)))  # the shortest decimal: 1e-05, not 9.999999747378752e-06
        return v

    def require(self, key: str):
        v = self.field(key)
        if v is None:
            raise ModelLoadError(f"{self.path}: GGUF metadata lacks {key}")
        return v

    @property
    def arch(self) -> str:
        return str(self.require("general.architecture"))

    def config(self) -> ModelConfig:
        if self._cfg is None:
            try:
                self._cfg = self._config()
            except ModelLoadError:
                raise
            except (TypeError, ValueError, KeyError) as e:
                raise ModelLoadError(f"{self.path}: malformed GGUF metadata ({_one_line(e)})") from None
        return self._cfg

    def _config(self) -> ModelConfig:
        arch = self.arch
        if arch not in GGUF_ARCHITECTURES:
            raise ModelLoadError(f"{self.path}: unsupported GGUF architecture {arch!r} "
                                 f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
        a = arch + "."
        hidden = int(self.require(a + "embedding_length"))
        heads = int(self.require(a + "attention.head_count"))
        kv = self.field(a + "attention.head_count_kv", heads)
        if isinstance(kv, list):  # per-layer counts: fine only when uniform
            if len(set(kv)) != 1:
                raise ModelLoadError(f"{self.path}: per-layer head_count_kv {kv} is not supported")
            kv = kv[0]
        head_dim = int(self.field(a + "attention.key_length", hidden // heads))
        rope_dim = self.field(a + "rope.dimension_count")
        if rope_dim is not None and int(rope_dim) != head_dim:
            raise ModelLoadError(f"{self.path}: partial rotary (rope.dimension_count {rope_dim} != "
                                 f"head_dim {head_dim}) is not supported")
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        vocab = self.field(a + "vocab_size")
        if vocab is None:
            if tokens is not None:
                vocab = len(tokens.data)
            elif "token_embd.weight" in self._tensors:
                vocab = int(self._tensors["token_embd.weight"].shape[-1])
            else:
                raise ModelLoadError(f"{self.path}: cannot tell the vocabulary size")
        eos_ids: list[int] = []
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            v = self.field(key)
            if v is not None and int(v) not in eos_ids:
                eos_ids.append(int(v))
        bos = self.field("tokenizer.ggml.bos_token_id")
        gemma = {}
        if arch == "gemma3":
            gemma = self._gemma3_fields(a, int(self.require(a + "block_count")), heads, hidden, head_dim)
            end_of_turn = self._token_id("<end_of_turn>")
            if end_of_turn is not None and end_of_turn not in eos_ids:
                eos_ids.append(end_of_turn)
        return ModelConfig(**gemma,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self.require(a + "feed_forward_length")),
            num_layers=int(self.require(a + "block_count")),
            num_heads=heads,
            num_kv_heads=int(kv),
            head_dim=head_dim,
            max_position_embeddings=int(self.field(a + "context_length", 2048)),
            rms_norm_eps=float(self.field(a + "attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self.field(a + "rope.freq_base", 10000.0)),
            rope_scaling=self._rope_scaling(a),
            tie_word_embeddings="output.weight" not in self._tensors,
            attention_bias="blk.0.attn_q.bias" in self._tensors,
            model_type={"qwen2": "qwen2", "gemma3": "gemma3"}.get(arch, "llama"),
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_ids=tuple(eos_ids),
        )

    def _gemma3_fields(self, a: str, num_layers: int, heads: int, hidden: int, head_dim: int) -> dict:
        """What llama.cpp's Gemma 3 does not write (or writes only in newer files), as its loader
        assumes it: every 6th layer global, local rope base 10000, and the attention scale
        1/sqrt(head_dim) but for the 27B (62 layers), which scales by 1/sqrt(hidden / heads)."""
        window = self.require(a + "attention.sliding_window")
        pattern = self.field(a + "attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # per layer: True = sliding (local)
            if len(pattern) != num_layers:
                raise ModelLoadError(f"{self.path}: {a}attention.sliding_window_pattern has {len(pattern)} "
                                     f"entries for {num_layers} layers")
            types = tuple(SLIDING if p else FULL for p in pattern)
        else:
            types = tuple(SLIDING if (i + 1) % int(pattern) else FULL for i in range(num_layers))
        for key in (a + "final_logit_softcapping", a + "attn_logit_softcapping"):
            if self.field(key) is not None:
                raise ModelLoadError(f"{self.path}: {key}: logit soft-capping is not supported")
        scalar = self.field(a + "attention.query_pre_attn_scalar")
        if scalar is None:
            scalar = hidden // heads if num_layers == 62 else head_dim
        return dict(hidden_act="gelu_pytorch_tanh", sliding_window=int(window), layer_types=types,
                    rope_local_base_freq=float(self.field(a + "rope.freq_base_swa", 10000.0)),
                    query_pre_attn_scalar=scalar)

    def _token_id(self, text: str) -> int | None:
        f = self.reader.fields.get("tokenizer.ggml.tokens")
        if f is None:
            return None
        want = text.encode()
        for i, idx in enumerate(f.data):
            if bytes(f.parts[idx]) == want:
                return i
        return None

    def _rope_scaling(self, a: str) -> dict | None:
        kind = self.field(a + "rope.scaling.type")
        factor = self.field(a + "rope.scaling.factor")
        orig = self.field(a + "rope.scaling.original_context_length")
        if kind is None and self.field(a + "rope.scale_linear") is not None:  # older files
            kind, factor = "linear", self.field(a + "rope.scale_linear")
        if "rope_freqs.weight" in self._tensors:
            if kind not in (None, "none"):
                raise ModelLoadError(f"{self.path}: rope_freqs together with rope.scaling.type {kind!r} "
                                     "is not supported")
            return self._llama3_from_rope_freqs(orig)
        if kind in (None, "none") or (factor is not None and float(factor) == 1.0 and kind == "linear"):
            return None
        if factor is None:
            raise ModelLoadError(f"{self.path}: rope.scaling.type {kind!r} without rope.scaling.factor")
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(factor)}
        if kind == "yarn":
            attn = self.field(a + "rope.scaling.attn_factor")
            if attn is not None and abs(float(attn) - 1.0) > 1e-6:
                raise ModelLoadError(f"{self.path}: YaRN rope.scaling.attn_factor={attn} is not supported")
            sc = {"rope_type": "yarn", "factor": float(factor)}
            if orig is not None:
                sc["original_max_position_embeddings"] = int(orig)
            for key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
                v = self.field(a + "rope.scaling." + key)
                if v is not None:
                    sc[hf_key] = float(v)
            return sc
        raise ModelLoadError(f"{self.path}: unsupported rope.scaling.type {kind!r} (supported: linear, yarn)")

    def _llama3_from_rope_freqs(self, orig) -> dict:
        """llama.cpp stores Llama 3.1-style rope scaling as a tensor of per-frequency divisors.
        Recover the HF parameters by matching the published parameter family."""
        import numpy as np
        from gguf.quants import dequantize

        from sparsespec.models.rope import _llama3

        t = self._tensors["rope_freqs.weight"]
        divisors = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
        hidden = int(self.require(self.arch + ".embedding_length"))
        heads = int(self.require(self.arch + ".attention.head_count"))
        head_dim = int(self.field(self.arch + ".attention.key_length", hidden // heads))
        base = float(self.field(self.arch + ".rope.freq_base", 10000.0))
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        factor = float(divisors.max())
        for old in ([int(orig)] if orig else []) + [8192, 4096, 2048, 16384, 32768]:
            for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 8.0)):
                sc = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                      "high_freq_factor": high, "original_max_position_embeddings": old}
                want = (inv / _llama3(sc, inv)).double().numpy()
                if want.shape == divisors.shape and np.allclose(want, divisors, rtol=1e-3, atol=1e-4):
                    return sc
        raise ModelLoadError(f"{self.path}: rope_freqs tensor does not match any Llama 3 rope scaling "
                             "this loader knows")

    # -- tensors ----------------------------------------------------------------------------

    def tensors(self, num_layers: int, progress: bool = False, desc: str | None = None
                ) -> Iterator[tuple[str, "Any"]]:
        """(HF name, float32 numpy array) for every model tensor of the first num_layers layers,
        with llama.cpp's q/k permutation undone. Unknown tensors -> ModelLoadError."""
        import numpy as np
        from gguf.quants import dequantize

        cfg = self.config()
        arch = self.arch
        todo = []
        unknown = []
        for t in self.reader.tensors:
            if t.name == "rope_freqs.weight":
                continue  # folded into the config
            hf = gguf_to_hf_name(t.name, arch)
            if hf is None:
                unknown.append(t.name)
                continue
            m = _GGUF_BLK.match(t.name)
            if m and num_layers <= int(m.group(1)) < cfg.num_layers:
                continue  # a truncated load: skip without decoding; layers past block_count stay
            todo.append((t, hf))
        if unknown:
            raise ModelLoadError(f"{self.path}: unexpected tensors {_names(unknown)}")
        bar = _progress(len(todo), desc or f"loading {self.path.name}", progress)
        try:
            for t, hf in todo:
                try:
                    w = dequantize(t.data, t.tensor_type)
                    w = w.reshape(tuple(int(x) for x in reversed(t.shape.tolist())))
                except Exception as e:  # noqa: BLE001 - corrupt tensor data or an unknown quant type
                    raise ModelLoadError(f"{self.path}: cannot decode tensor {t.name} "
                                         f"({t.tensor_type.name}): {_one_line(e)}") from None
                if arch == "llama":
                    if ".attn_q." in t.name:
                        w = llama_unpermute(w, cfg.num_heads)
                    elif ".attn_k." in t.name:
                        w = llama_unpermute(w, cfg.num_kv_heads)
                w = np.ascontiguousarray(w, dtype=np.float32)
                if not w.flags.writeable:  # a view into the file's read-only memory map
                    w = w.copy()
                yield hf, w
                bar(1)
        finally:
            bar(None)


def _progress(total: int, desc: str, enabled: bool) -> Callable[[int | None], None]:
    """A tqdm bar as a callable: bar(n) advances, bar(None) closes. No-op when disabled."""
    if not enabled:
        return lambda n: None
    from tqdm.auto import tqdm
    t = tqdm(total=total, desc=desc, unit="tensor")

    def step(n):
        if n is None:
            t.close()
        else:
            t.update(n)
    return step
