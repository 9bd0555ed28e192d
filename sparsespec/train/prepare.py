"""Everything a run needs, checked before any compute: models on disk, vocabularies, data, windows.

Validation reads configs and text only (no weights), so a bad flag costs a second, not a teacher
pass. Loading comes after.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kvstore.cache.full import FullKVCache
from sparsespec.errors import InvalidArgument
from sparsespec.models import load_model, load_tokenizer, resolve_model
from sparsespec.models.loader import load_config
from sparsespec.train.config import TrainConfig
from sparsespec.train.data import Corpus, load_documents, make_windows, split_corpus


@dataclass
class Plan:
    cfg: TrainConfig
    verifier_dir: Path
    drafter_dir: Path | None            # None: layers:N of the verifier
    tokenizer: object
    corpus: Corpus
    train_windows: list[list[int]]      # [windows][prefix + continuation]
    heldout_windows: list[list[int]]


def plan(cfg: TrainConfig) -> Plan:
    """Validate the run against the models and data; InvalidArgument names the field."""
    verifier_dir = _resolve("verifier", cfg.verifier)
    vcfg = load_config(verifier_dir)
    drafter_dir = None
    n = cfg.drafter_layers()
    if n is not None:
        if n > vcfg.num_layers:
            raise InvalidArgument("drafter", f"layers:{n} exceeds the verifier's {vcfg.num_layers} layers")
    else:
        drafter_dir = _resolve("drafter", cfg.drafter)
        dcfg = load_config(drafter_dir)
        if dcfg.vocab_size != vcfg.vocab_size:
            raise InvalidArgument("drafter", f"vocabulary size {dcfg.vocab_size} differs from the verifier's "
                                             f"{vcfg.vocab_size}: they must share a tokenizer")
    if cfg.window > vcfg.max_position_embeddings:
        raise InvalidArgument("prefix", f"prefix + continuation = {cfg.window} exceeds the verifier's "
                                        f"{vcfg.max_position_embeddings} positions")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgument("device", f"{cfg.device!r} requested but no CUDA device is available")
    tokenizer = load_tokenizer(verifier_dir)
    corpus = split_corpus(load_documents(cfg.data), tokenizer, cfg.heldout_docs, cfg.window, cfg.seed)
    train = make_windows(corpus.train, cfg.window, cfg.windows, cfg.seed)
    held = make_windows(corpus.heldout, cfg.window, cfg.heldout_windows, cfg.seed + 1)
    return Plan(cfg, verifier_dir, drafter_dir, tokenizer, corpus, train, held)


def _resolve(field: str, spec: str) -> Path:
    """resolve_model, with the error naming our flag rather than `model`."""
    try:
        return resolve_model(spec)
    except InvalidArgument as e:
        raise InvalidArgument(field, str(e).split(": ", 1)[1]) from None


def load_verifier(p: Plan):
    model = load_model(p.verifier_dir, device=p.cfg.device).eval()
    model.requires_grad_(False)
    return model


def load_student(p: Plan):
    """An independent copy of the drafter (training must not touch the verifier's weights),
    with the embedding and head frozen when asked, packed once before an optimizer sees it."""
    n = p.cfg.drafter_layers()
    src = p.verifier_dir if n is not None else p.drafter_dir
    model = load_model(src, device=p.cfg.device, num_layers=n)
    return make_trainable(model, p.cfg.freeze_embeddings)


def make_trainable(model, freeze_embeddings: bool):
    model.train()
    model.requires_grad_(True)
    if freeze_embeddings:
        model.embed_tokens.weight.requires_grad_(False)
        model.lm_head.weight.requires_grad_(False)
    # Inference forwards (no_grad) pack q/k/v and gate/up into one matrix and re-point the layers'
    # parameters to views of it (models/packed.py). Do it now, so the parameters the optimizer
    # holds are the ones every later forward reads.
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long, device=model.device), FullKVCache.for_model(model, 1))
    return model


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, q) for n, q in model.named_parameters() if q.requires_grad]
