"""From flags to a running engine: load the verifier, make the drafter, wire the caches."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kvstore.cache.sparse import SparseConfig
from sparsespec.errors import InvalidArgument
from sparsespec.models import load_model, load_tokenizer, resolve_model
from sparsespec.models.quant import check_drafter_weights, drafter_weights
from sparsespec.models.truncate import layer_truncated
from sparsespec.spec.drafter_host import DrafterHost, DrafterHostConfig, LocalDrafterClient
from sparsespec.spec.loop import SpecEngine

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidArgument("dtype", f"unknown dtype {name!r}; known: {sorted(set(DTYPES))}") from None


def parse_budget(value: str | int | None) -> int | None:
    """'full' -> None (keep everything); otherwise a positive integer."""
    if value is None or (isinstance(value, str) and value.lower() == "full"):
        return None
    try:
        budget = int(value)
    except ValueError:
        raise InvalidArgument("budget", f"must be a positive integer or 'full', got {value!r}") from None
    if budget < 1:
        raise InvalidArgument("budget", f"must be >= 1, got {budget}")
    return budget


FED_POLICY, OWN_POLICY = "fed", "chunk_topk"


def default_policy(drafter: str) -> str:
    """The drafter's KV policy when none is given: "fed" (the verifier's exact K/V,
    kvstore/cache/feed.py) for a drafter that shares the verifier's K/V (same, layers:N),
    chunk_topk for one with weights of its own. `--policy chunk_topk` turns feeding off."""
    return FED_POLICY if drafter == "same" or drafter.startswith("layers:") else OWN_POLICY


@dataclass(frozen=True)
class EngineConfig:
    model: str
    drafter: str = "same"            # same | DIR | layers:N
    policy: str | None = None        # None: default_policy(drafter)
    budget: int | None = 256         # None = full
    dtype: str = "float32"
    device: str = "cpu"
    max_context: int | None = None
    max_batch: int = 8
    drafter_weights: str = "same"    # same | bf16 | int8 | int4 (sparsespec.models.quant)

    def __post_init__(self):
        check_device(self.device)
        check_drafter_weights(self.drafter_weights)
        if self.policy is None:
            object.__setattr__(self, "policy", default_policy(self.drafter))

    def sparse_config(self) -> SparseConfig:
        if self.budget is None or self.policy == "full":
            return SparseConfig(policy="full", budget=None)
        return SparseConfig(policy=self.policy, budget=self.budget)


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N, and CUDA only where it exists: refused before any model loads."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgument("device", f"expected cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgument("device", f"expected cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgument("device", f"{device!r} requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgument("device", f"{device!r}: this machine has {torch.cuda.device_count()} GPUs")


def load_verifier(cfg: EngineConfig):
    path = resolve_model(cfg.model)
    model = load_model(path, dtype=parse_dtype(cfg.dtype), device=cfg.device, max_context=cfg.max_context)
    return model.eval(), load_tokenizer(path)


def make_drafter_model(verifier, spec: str, cfg: EngineConfig):
    """`same` shares the verifier's weights; `layers:N` shares its first N layers; else a path."""
    if spec == "same":
        return verifier
    if spec.startswith("layers:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise InvalidArgument("drafter", f"expected layers:N, got {spec!r}") from None
        return layer_truncated(verifier, n)
    path = resolve_model(spec)
    drafter = load_model(path, dtype=parse_dtype(cfg.dtype), device=cfg.device,
                         max_context=verifier.max_context).eval()
    check_same_tokenizer(verifier.cfg, drafter.cfg, lambda: load_tokenizer(resolve_model(cfg.model)),
                         lambda: load_tokenizer(path))
    return drafter


def check_same_tokenizer(verifier_cfg, drafter_cfg, verifier_tokenizer, drafter_tokenizer) -> None:
    """A drafter must speak the verifier's tokens: the same vocabulary size, BOS and EOS ids, and
    (where both directories hold a tokenizer; the arguments are callables that load them) the same
    tokenizer fingerprint (size, special ids, every token string). InvalidArgument on `drafter`."""
    from sparsespec.errors import ModelLoadError
    from sparsespec.tokens import tokenizer_fingerprint

    def refuse(what, d, v):
        raise InvalidArgument("drafter", f"its tokenizer differs from the verifier's ({what}: {d} vs {v}); "
                                         "a drafter must share the verifier's tokenizer")

    if drafter_cfg.vocab_size != verifier_cfg.vocab_size:
        refuse("vocabulary size", drafter_cfg.vocab_size, verifier_cfg.vocab_size)
    if drafter_cfg.bos_token_id != verifier_cfg.bos_token_id:
        refuse("BOS id", drafter_cfg.bos_token_id, verifier_cfg.bos_token_id)
    if set(drafter_cfg.eos_token_ids) != set(verifier_cfg.eos_token_ids):
        refuse("EOS ids", sorted(drafter_cfg.eos_token_ids), sorted(verifier_cfg.eos_token_ids))
    try:
        v_tok, d_tok = verifier_tokenizer(), drafter_tokenizer()
    except ModelLoadError:
        return  # a directory without a tokenizer (tiny test models): the ids above are all we have
    fv, fd = tokenizer_fingerprint(v_tok), tokenizer_fingerprint(d_tok)
    if fv != fd:
        refuse("fingerprint of size, BOS/EOS ids and token strings", fd, fv)


def build_engine(cfg: EngineConfig, verifier=None, tokenizer=None) -> tuple[SpecEngine, object]:
    """Returns (engine, tokenizer). Pass an already loaded verifier to share it between engines."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    sparse = cfg.sparse_config()  # validate flags before loading anything
    if verifier is None:
        verifier, tokenizer = load_verifier(cfg)
    drafter_model = drafter_weights(make_drafter_model(verifier, cfg.drafter, cfg), cfg.drafter_weights)
    max_context = cfg.max_context or verifier.max_context
    client = LocalDrafterClient(DrafterHost(drafter_model, DrafterHostConfig(sparse, max_context)))
    eos = set(verifier.cfg.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    engine = SpecEngine(verifier, client, tokenizer, max_context, cfg.max_batch, sorted(eos))
    return engine, tokenizer
