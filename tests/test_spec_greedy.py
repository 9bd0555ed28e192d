"""Lossless greedy speculation: every policy x budget x k equals the verifier decoding alone."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model
from equality import assert_greedy_equal
from kvstore.cache.sparse import SparseConfig
from sparsespec.models.truncate import layer_truncated
from sparsespec.spec.adaptive import AdaptiveConfig
from sparsespec.spec.drafter_host import DrafterHost, DrafterHostConfig, LocalDrafterClient
from sparsespec.spec.loop import GenerationRequest, SpecEngine

POLICY_BUDGETS = [(p, b) for p in ("streaming", "chunk_topk", "snapkv", "verifier_guided") for b in (16, 256)] + [("full", None)]
MAX_TOKENS = 40


def engine(verifier, drafter_model, policy, budget, max_batch=2):
    client = LocalDrafterClient(DrafterHost(drafter_model, DrafterHostConfig(SparseConfig(policy=policy, budget=budget),
                                                                           drafter_model.max_context)))
    return SpecEngine(verifier, client, max_batch=max_batch)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.fixture(scope="module")
def ar_tokens(tiny_model, prompt):
    out = SpecEngine(tiny_model, None).generate(GenerationRequest(prompt, MAX_TOKENS, mode="ar"))
    assert len(out.token_ids) == MAX_TOKENS and out.metrics.ar_steps == MAX_TOKENS
    return out.token_ids


@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("policy,budget", POLICY_BUDGETS)
def test_self_drafter_equals_ar(tiny_model, prompt, ar_tokens, policy, budget, k):
    out = engine(tiny_model, tiny_model, policy, budget).generate(GenerationRequest(prompt, MAX_TOKENS, k=k))
    assert_greedy_equal(tiny_model, prompt, ar_tokens, out.token_ids, f"{policy}/{budget}/k={k}")
    m = out.metrics
    assert m.rounds > 0 and m.drafted == m.k_sum and 0 <= m.accepted <= m.drafted
    assert m.generated == MAX_TOKENS
    if budget is None:  # the drafter IS the verifier with the same cache: everything is accepted
        assert m.alpha == 1.0


@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("drafter", ["layers:1", "other"])
def test_other_drafters_equal_ar(tiny_model, prompt, ar_tokens, drafter, k):
    d = layer_truncated(tiny_model, 1) if drafter == "layers:1" else random_model(seed=7)
    out = engine(tiny_model, d, "chunk_topk", 64).generate(GenerationRequest(prompt, MAX_TOKENS, k=k))
    assert_greedy_equal(tiny_model, prompt, ar_tokens, out.token_ids, f"{drafter}/k={k}")


def test_adaptive_k_equals_ar(tiny_model, prompt, ar_tokens):
    req = GenerationRequest(prompt, MAX_TOKENS, k=4, adaptive=AdaptiveConfig(enabled=True, k_max=8))
    out = engine(tiny_model, tiny_model, "streaming", 16).generate(req)
    assert_greedy_equal(tiny_model, prompt, ar_tokens, out.token_ids, "adaptive")
    assert out.metrics.ar_steps >= 1  # the first step calibrates the cost model


def test_two_sessions_in_one_batch_equal_each_alone(tiny_model):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (120, 310)]
    alone = [SpecEngine(tiny_model, None).generate(GenerationRequest(p, 30, mode="ar")).token_ids
             for p in prompts]
    for k in (1, 4):
        batched = engine(tiny_model, tiny_model, "chunk_topk", 32).generate_many(
            [GenerationRequest(p, 30, k=k) for p in prompts])
        for p, a, b in zip(prompts, alone, batched):
            assert_greedy_equal(tiny_model, p, a, b.token_ids, f"batched k={k}")
    # mixed: one session speculating, one plain, in the same verifier forward
    mixed = engine(tiny_model, tiny_model, "streaming", 16).generate_many(
        [GenerationRequest(prompts[0], 30, k=8), GenerationRequest(prompts[1], 30, mode="ar")])
    for p, a, b in zip(prompts, alone, mixed):
        assert_greedy_equal(tiny_model, p, a, b.token_ids, "mixed")


def test_stops_cut_exactly_where_ar_stops(tiny_model, prompt, ar_tokens):
    eos = ar_tokens[17]
    first = ar_tokens.index(eos)
    ar = SpecEngine(tiny_model, None, eos_ids=[eos]).generate(GenerationRequest(prompt, MAX_TOKENS, mode="ar"))
    full = DrafterHostConfig(SparseConfig(policy="full", budget=None), tiny_model.max_context)
    spec = SpecEngine(tiny_model, LocalDrafterClient(DrafterHost(tiny_model, full)),
                      eos_ids=[eos]).generate(GenerationRequest(prompt, MAX_TOKENS, k=8))
    assert ar.token_ids == spec.token_ids == ar_tokens[:first + 1]
    assert ar.metrics.stop_reason == spec.metrics.stop_reason == "eos"


def test_context_limit_stops_both_modes(tiny_model):
    prompt = list(range(100))
    ar = SpecEngine(tiny_model, None, max_context=110).generate(GenerationRequest(prompt, 50, mode="ar"))
    spec = engine(tiny_model, tiny_model, "full", None).generate(GenerationRequest(prompt, 50, k=8))
    assert len(ar.token_ids) == 10 and ar.metrics.stop_reason == "context_limit"
    full = DrafterHostConfig(SparseConfig(policy="full", budget=None), 110)
    spec_limited = SpecEngine(tiny_model, LocalDrafterClient(DrafterHost(tiny_model, full)), max_context=110)
    out = spec_limited.generate(GenerationRequest(prompt, 50, k=8))
    assert out.token_ids == ar.token_ids and out.metrics.stop_reason == "context_limit"
    assert spec.token_ids[:10] == ar.token_ids
