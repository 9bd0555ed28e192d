"""`sparsespec train eval`: trained checkpoints (and layers:N baselines) on the same held-out prompts.

The held-out documents are the ones the checkpoints' runs held out (their train_config.json), so
no variant is evaluated on text it trained on; every checkpoint must agree on that split.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from sparsespec.errors import InvalidArgument
from sparsespec.models import load_model, load_tokenizer, resolve_model
from sparsespec.models.loader import load_config
from sparsespec.train.checkpoint import CONFIG
from sparsespec.train.config import TrainConfig
from sparsespec.train.data import eval_prompts, load_documents, split_corpus
from sparsespec.train.spec_eval import SpecEvalConfig, spec_eval

SPLIT_FIELDS = ("verifier", "data", "heldout_docs", "prefix", "continuation", "seed")


def _split_config(specs: dict[str, str]) -> TrainConfig:
    configs = {}
    for name, spec in specs.items():
        if spec.startswith("layers:"):
            continue
        f = Path(spec) / CONFIG
        if not f.is_file():
            raise InvalidArgument("variants", f"{name}: {spec} is not a training checkpoint (no {CONFIG})")
        configs[name] = TrainConfig.from_dict(json.loads(f.read_text()))
    if not configs:
        raise InvalidArgument("variants", "need at least one training checkpoint (it defines the held-out split)")
    first_name, first = next(iter(configs.items()))
    for name, c in configs.items():
        for field in SPLIT_FIELDS:
            if getattr(c, field) != getattr(first, field):
                raise InvalidArgument("variants", f"{name} was trained with {field}={getattr(c, field)!r}, "
                                                  f"{first_name} with {getattr(first, field)!r}: the held-out "
                                                  "split must be the same")
    return first


def evaluate(specs: dict[str, str], context: int, num_prompts: int, max_tokens: int, k: int,
             threads: int = 1, progress: bool = True) -> dict:
    split = _split_config(specs)
    verifier_dir = resolve_model(split.verifier)
    vcfg = load_config(verifier_dir)
    if context + max_tokens + 1 > vcfg.max_position_embeddings:
        raise InvalidArgument("context", f"{context} + {max_tokens} new tokens exceed the verifier's "
                                         f"{vcfg.max_position_embeddings} positions")
    for name, spec in specs.items():
        if not spec.startswith("layers:") and load_config(Path(spec)).vocab_size != vcfg.vocab_size:
            raise InvalidArgument("variants", f"{name}: vocabulary differs from the verifier's")
    tokenizer = load_tokenizer(verifier_dir)
    corpus = split_corpus(load_documents(split.data), tokenizer, split.heldout_docs, split.window, split.seed)
    prompts = eval_prompts(corpus.heldout, context, num_prompts)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    verifier = load_model(verifier_dir).eval()
    drafters = {}
    for name, spec in specs.items():
        if spec.startswith("layers:"):
            drafters[name] = load_model(verifier_dir, num_layers=int(spec.split(":", 1)[1])).eval()
        else:
            drafters[name] = load_model(Path(spec)).eval()
    cfg = SpecEvalConfig(max_tokens=max_tokens, k=k, policy=split.policy)
    result = spec_eval(verifier, tokenizer, drafters, prompts, cfg, progress)
    result.update({"variants": specs, "heldout_documents": [n for n, _ in corpus.heldout],
                   "threads": threads, "wall_s": round(time.perf_counter() - t0, 1)})
    return result
