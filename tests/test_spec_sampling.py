"""Sampling is lossless: speculative output is distributed exactly as the verifier sampling alone.

Tiny vocabulary (8), two generated tokens -> 64 outcomes whose exact probabilities we compute from
the verifier's processed distributions. A chi-square test must accept our AR sampler and our
speculative sampler and must reject a deliberately wrong acceptance rule (so it can fail).
"""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import random_model
from kvstore.cache.full import FullKVCache
from kvstore.cache.sparse import SparseConfig
from kvstore.cache.stacked import StackedKVCache
from sparsespec.spec import acceptance
from sparsespec.spec.drafter_host import DrafterHost, DrafterHostConfig, LocalDrafterClient
from sparsespec.spec.loop import GenerationRequest, SpecEngine
from sparsespec.spec.sampling import SamplingParams, target_probs
from sparsespec.spec.summaries import ScheduleConfig

VOCAB, PROMPT, DRAWS, BATCH = 8, [3, 1, 4, 1, 5, 2, 6], 20_000, 250
PARAMS = SamplingParams(temperature=0.9, top_p=0.95, top_k=6, seed=1234)


@torch.inference_mode()
def exact_distribution(model) -> torch.Tensor:
    """P(x1, x2 | prompt) under the verifier's processed distribution, [V, V]."""
    def probs(ctx):
        cache = FullKVCache.for_model(model, len(ctx) + 1)
        return target_probs(model(torch.tensor([ctx]), cache, last_only=True)[0], PARAMS)[0].double()
    p1 = probs(PROMPT)
    return torch.stack([p1[a] * probs(PROMPT + [a]) for a in range(VOCAB)])


def chi_square_pvalue(counts: torch.Tensor, expected_p: torch.Tensor) -> float:
    """Pearson chi-square over outcomes with non-negligible mass, pooling the rest.

    An outcome of probability exactly 0 (masked by top-k/top-p) that was sampled at all is
    proof of a wrong sampler: p-value 0.
    """
    n = counts.sum()
    if counts[expected_p == 0].sum() > 0:
        return 0.0
    keep = expected_p * n >= 5
    exp = expected_p[keep] * n
    obs = counts[keep]
    rest_obs, rest_exp = counts[~keep].sum(), expected_p[~keep].sum() * n
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = int(keep.sum()) - 1
    if rest_exp > 0:
        stat += float((rest_obs - rest_exp) ** 2 / rest_exp)
        df += 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def sample_counts(engine, mode: str, max_tokens: int = 2, draws: int = DRAWS) -> torch.Tensor:
    """Counts of the first two tokens. max_tokens 3 lets the first round draft k = 2, so the
    second draft comes from a batched drafter forward."""
    counts = torch.zeros(VOCAB * VOCAB, dtype=torch.float64)
    for i in range(draws // BATCH):
        params = SamplingParams(PARAMS.temperature, PARAMS.top_p, PARAMS.top_k, seed=PARAMS.seed + i,
                                q_support=4)
        reqs = [GenerationRequest(PROMPT, max_tokens, SamplingParams(params.temperature, params.top_p, params.top_k,
                                                            seed=params.seed * 1000 + j, q_support=4),
                                  k=2, mode=mode) for j in range(BATCH)]
        for out in engine.generate_many(reqs):
            a, b = out.token_ids[:2]
            counts[a * VOCAB + b] += 1
    return counts


@pytest.fixture(scope="module")
def models():
    verifier = random_model(seed=11, vocab=VOCAB, std=0.5)
    drafter = random_model(seed=12, vocab=VOCAB, std=0.5)  # deliberately a different q
    return verifier, drafter


@pytest.fixture(scope="module")
def exact(models):
    return exact_distribution(models[0]).flatten()


def make_engine(models, policy="streaming"):
    verifier, drafter = models
    host = DrafterHost(drafter, DrafterHostConfig(SparseConfig(policy=policy, budget=4), 16))
    return SpecEngine(verifier, LocalDrafterClient(host),
                      max_batch=BATCH, schedule=ScheduleConfig(every_rounds=1, min_gap_rounds=1))


def test_ar_sampler_matches_exact(models, exact):
    counts = sample_counts(SpecEngine(models[0], None, max_batch=BATCH), "ar")
    assert chi_square_pvalue(counts, exact) > 1e-3


def test_spec_sampler_matches_exact(models, exact, monkeypatch):
    # Every round drafts the batch's sessions together: one forward per draft position.
    stacked = []
    init = StackedKVCache.__init__
    monkeypatch.setattr(StackedKVCache, "__init__", lambda self, caches: stacked.append(len(caches)) or init(self, caches))
    counts = sample_counts(make_engine(models), "spec", max_tokens=3)
    assert max(stacked) == BATCH
    assert chi_square_pvalue(counts, exact) > 1e-3


def test_spec_sampler_with_kv_summaries_matches_exact(models, exact, monkeypatch):
    # verifier_guided re-selects the drafter's KV from the verifier's summary before drafting,
    # which changes q: the output must still follow p exactly.
    sent = []
    finish = SpecEngine.finish
    monkeypatch.setattr(SpecEngine, "finish", lambda self, run: sent.append(run.summary.sent) or finish(self, run))
    # Half the draws (CI time: this path re-selects every generation): the chi-square stays valid,
    # and test_wrong_acceptance_rule_is_rejected shows the power of the full count.
    counts = sample_counts(make_engine(models, "verifier_guided"), "spec", draws=DRAWS // 2)
    assert sum(sent) == DRAWS // 2             # every generation's first draft carried a summary
    assert chi_square_pvalue(counts, exact) > 1e-3


def test_wrong_acceptance_rule_is_rejected(models, exact, monkeypatch):
    # Accept every draft: the output then follows the drafter's q, not the verifier's p. A quarter
    # of the draws is ample power for that (its p-value underflows to 0 at 5,000).
    wrong = functools.partial(acceptance.accept_sampling, ratio_rule=lambda p_x, q_x: 1.0)
    monkeypatch.setattr(acceptance, "accept_sampling", wrong)
    counts = sample_counts(make_engine(models), "spec", draws=DRAWS // 4)
    p = chi_square_pvalue(counts, exact)
    assert p < 1e-6, p


def test_drafter_q_is_small_support_and_exact():
    from sparsespec.spec.sampling import draft_distribution
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    q = draft_distribution(logits, SamplingParams(temperature=1.0, q_support=5))
    assert len(q.ids) == 5 and abs(float(q.probs.sum()) - 1) < 1e-6
    dense = q.dense(50)
    assert all(dense[i] == 0 for i in range(50) if i not in q.ids.tolist())
