"""Lossless greedy speculation on the real SmolLM2-135M with a 1,024-token real-text prompt.

Every policy x budget {16, 256, full} x k {1, 8} must equal the verifier decoding alone (or
differ only at a proven near-tie), and two sessions of different lengths verified in one batch
(k 4 and 8) must each equal their own AR output. (k 4 left the grid for CI time: each cell pays
two 1K prefills, ~25-60 s on a CI worker; the layer-truncated drafter and the batch run k 4.)
"""

from __future__ import annotations

import pytest

from equality import assert_greedy_equal
from kvstore.cache.sparse import SparseConfig
from sparsespec.data import kjv
from sparsespec.models.truncate import layer_truncated
from sparsespec.spec.drafter_host import DrafterHost, DrafterHostConfig, LocalDrafterClient
from sparsespec.spec.loop import GenerationRequest, SpecEngine

pytestmark = pytest.mark.smollm2

CONTEXT, MAX_TOKENS = 1024, 24
POLICY_BUDGETS = [(p, b) for p in ("streaming", "chunk_topk", "snapkv", "verifier_guided") for b in (16, 256)] + [("full", None)]


def spec_engine(model, drafter_model, policy, budget, max_batch=1):
    client = LocalDrafterClient(DrafterHost(drafter_model, DrafterHostConfig(SparseConfig(policy=policy, budget=budget),
                                                                           model.max_context)))
    return SpecEngine(model, client, max_batch=max_batch)


@pytest.fixture(scope="module")
def prompt(smollm2):
    ids = kjv.prompt_of_tokens(smollm2[1], CONTEXT, book="Genesis")
    assert len(ids) == CONTEXT
    return ids


@pytest.fixture(scope="module")
def ar_tokens(smollm2, prompt):
    out = SpecEngine(smollm2[0], None).generate(GenerationRequest(prompt, MAX_TOKENS, mode="ar"))
    assert len(out.token_ids) == MAX_TOKENS
    return out.token_ids


@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("policy,budget", POLICY_BUDGETS)
def test_smollm2_self_drafter_equals_ar(smollm2, prompt, ar_tokens, policy, budget, k):
    model = smollm2[0]
    out = spec_engine(model, model, policy, budget).generate(GenerationRequest(prompt, MAX_TOKENS, k=k))
    assert_greedy_equal(model, prompt, ar_tokens, out.token_ids, f"{policy}/{budget}/k={k}")
    assert out.metrics.rounds > 0 and out.metrics.generated == MAX_TOKENS


def test_smollm2_layer_truncated_drafter_equals_ar(smollm2, prompt, ar_tokens):
    model = smollm2[0]
    out = spec_engine(model, layer_truncated(model, 6), "chunk_topk", 256).generate(
        GenerationRequest(prompt, MAX_TOKENS, k=4))
    assert_greedy_equal(model, prompt, ar_tokens, out.token_ids, "layers:6")


def test_smollm2_two_sessions_in_one_batch(smollm2, prompt, ar_tokens):
    model, tokenizer = smollm2
    other = kjv.prompt_of_tokens(tokenizer, CONTEXT - 157, book="Matthew")
    alone = SpecEngine(model, None).generate(GenerationRequest(other, MAX_TOKENS, mode="ar")).token_ids
    engine = spec_engine(model, model, "chunk_topk", 256, max_batch=2)
    a, b = engine.generate_many([GenerationRequest(prompt, MAX_TOKENS, k=4),
                                 GenerationRequest(other, MAX_TOKENS, k=8)])
    assert_greedy_equal(model, prompt, ar_tokens, a.token_ids, "batched long")
    assert_greedy_equal(model, other, alone, b.token_ids, "batched short")
