"""Overlapped rounds (issue #13, --cohorts 2): one cohort is verified while the drafter drafts the
other. Each session's round stays draft -> verify -> commit, so every output equals AR's, with a
drafter that fails mid-overlap too, and sampling keeps the verifier's distribution."""

from __future__ import annotations

import threading

import pytest
import torch

from equality import assert_greedy_equal
from kvstore.cache.sparse import SparseConfig
from sparsespec.errors import InvalidArgument
from sparsespec.spec.drafter_host import DrafterHost, DrafterHostConfig, LocalDrafterClient
from sparsespec.spec.loop import GenerationRequest, SpecEngine
from sparsespec.spec.transport import DrafterUnavailable

MAX_TOKENS = 30
OVERLAP_WAIT_S = 2.0


class VerifyCount:
    """How many verify forwards have begun (written on the loop's thread, read on the drafting one)."""
    begun = 0
    changed = threading.Condition()


class Overlap(LocalDrafterClient):
    """Records which thread drafts and whether a verify began meanwhile; fails every `fail_every`-th
    call (on the drafting thread, mid-overlap). Until one overlap is seen a call waits (bounded) for
    a verify to begin before it returns: a tiny model drafts faster than the loop's thread reaches
    its verify on a loaded worker, and a loop that joined the drafts before verifying never gets one."""

    def __init__(self, host, fail_every=0):
        super().__init__(host)
        self.fail_every, self.calls, self.overlapped, self.threads = fail_every, 0, 0, set()
        self.failed = 0

    def draft_many(self, calls):
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        before = VerifyCount.begun
        results = super().draft_many(calls)
        if not self.overlapped:
            with VerifyCount.changed:
                VerifyCount.changed.wait_for(lambda: VerifyCount.begun != before, timeout=OVERLAP_WAIT_S)
        if VerifyCount.begun != before:
            self.overlapped += 1                       # a verify began before this call returned
        if self.fail_every and self.calls % self.fail_every == 0:
            self.failed += 1
            return [DrafterUnavailable("injected mid-overlap")] * len(calls)
        return results


def make(tiny_model, policy, budget, fail_every=0, max_batch=4):
    host = DrafterHost(tiny_model, DrafterHostConfig(SparseConfig(policy=policy, budget=budget), tiny_model.max_context))
    client = Overlap(host, fail_every)
    return SpecEngine(tiny_model, client, max_batch=max_batch, cohorts=2), client


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in (40, 130, 260, 75)]


@pytest.fixture(scope="module")
def ar(tiny_model, prompts):
    return [SpecEngine(tiny_model, None).generate(GenerationRequest(p, MAX_TOKENS, mode="ar")).token_ids
            for p in prompts]


@pytest.fixture(autouse=True)
def count_verifies(monkeypatch):
    from sparsespec.spec.verifier import Verifier
    real = Verifier.verify

    def counted(self, rows, inputs):
        with VerifyCount.changed:
            VerifyCount.begun += 1
            VerifyCount.changed.notify_all()
        return real(self, rows, inputs)
    monkeypatch.setattr(Verifier, "verify", counted)


@pytest.mark.parametrize("policy,budget,k", [("fed", 32, 4), ("chunk_topk", 32, 3), ("fed", 512, 2)])
def test_cohorts_equal_ar(tiny_model, prompts, ar, policy, budget, k):
    engine, client = make(tiny_model, policy, budget)
    outs = engine.generate_many([GenerationRequest(p, MAX_TOKENS, k=k) for p in prompts])
    for p, a, o in zip(prompts, ar, outs):
        assert_greedy_equal(tiny_model, p, a, o.token_ids, f"cohorts {policy}/{budget}/k={k}")
        assert o.metrics.rounds > 0 and o.metrics.drafter_failures == 0
    assert any(name.startswith("cohort-draft") for name in client.threads)   # drafted off the loop's thread
    assert client.overlapped > 0                                              # ... while a cohort verified


def test_a_drafter_failing_mid_overlap_costs_plain_steps_never_tokens(tiny_model, prompts, ar):
    engine, client = make(tiny_model, "fed", 32, fail_every=3)
    outs = engine.generate_many([GenerationRequest(p, MAX_TOKENS, k=4) for p in prompts])
    for p, a, o in zip(prompts, ar, outs):
        assert_greedy_equal(tiny_model, p, a, o.token_ids, "failing mid-overlap")
    assert client.failed >= 2 and sum(o.metrics.drafter_failures for o in outs) >= 2
    assert all(o.metrics.rounds > 0 for o in outs)                          # re-opened fed, drafting again


def test_sessions_join_and_leave_between_overlapped_steps(tiny_model, prompts, ar):
    """A server's loop: runs start and finish between steps; the in-flight cohort's drafts of a
    run that left are dropped, a run that joined is drafted in its own step."""
    engine, _ = make(tiny_model, "fed", 32)
    reqs = [GenerationRequest(p, MAX_TOKENS, k=3) for p in prompts]
    running = [engine.start(reqs[0], 0), engine.start(reqs[1], 1)]
    done, later = {}, [(2, reqs[2]), (3, reqs[3])]
    while running:
        engine.step(running)
        for r in [r for r in running if r.done]:
            running.remove(r)
            engine.release(r)
            done[r.row] = engine.finish(r).token_ids
        if later and len(done) + len(running) < 4:
            row, req = later.pop(0)
            running.append(engine.start(req, row))
    for row, (p, a) in enumerate(zip(prompts, ar)):
        assert_greedy_equal(tiny_model, p, a, done[row], f"joined row {row}")


def test_adaptive_sessions_learn_their_cohorts_regime(tiny_model, prompts, ar):
    """With cohorts 2 a session drafts in a batch of its cohort's runs, so that is the width of
    the regime its adaptive k is seeded from and teaches; outputs stay AR's."""
    from sparsespec.spec.adaptive import AdaptiveConfig, regime
    engine, _ = make(tiny_model, "fed", 32)
    adaptive = AdaptiveConfig(k_max=4)
    runs = [engine.start(GenerationRequest(p, MAX_TOKENS, k=3, adaptive=adaptive), row) for row, p in enumerate(prompts)]
    while any(not r.done for r in runs):
        engine.step([r for r in runs if not r.done])
    assert [r.regime for r in runs] == [regime(2, len(p)) for p in prompts]
    for r, p, a in zip(runs, prompts, ar):
        engine.release(r)
        assert_greedy_equal(tiny_model, p, a, engine.finish(r).token_ids, f"adaptive cohort row {r.row}")


def test_sampling_with_cohorts_matches_exact():
    """The chi-square test of test_spec_sampling with two cohorts overlapping."""
    import test_spec_sampling as ss
    from conftest import random_model
    verifier = random_model(seed=11, vocab=ss.VOCAB, std=0.5)
    drafter = random_model(seed=12, vocab=ss.VOCAB, std=0.5)
    exact = ss.exact_distribution(verifier).flatten()
    host = DrafterHost(drafter, DrafterHostConfig(SparseConfig(policy="streaming", budget=4), 16))
    engine = SpecEngine(verifier, LocalDrafterClient(host), max_batch=ss.BATCH, cohorts=2)
    counts = ss.sample_counts(engine, "spec", max_tokens=3, draws=ss.DRAWS // 2)   # half the Llama test's (CI time)
    assert engine._pool is not None                    # the overlapped path ran
    assert ss.chi_square_pvalue(counts, exact) > 1e-3


def test_cohorts_is_validated(tiny_model):
    with pytest.raises(InvalidArgument, match="^cohorts: "):
        SpecEngine(tiny_model, None, cohorts=3)


def test_cohorts_through_the_services(tmp_path, redis_srv):
    """`--cohorts 2` on a real verifier process, a fed drafter process, 4 concurrent sessions."""
    from sparsespec.client import SparseSpecClient
    from sparsespec.cluster import ClusterConfig, LocalCluster
    from sparsespec.models import load_model, load_tokenizer
    from sparsespec.models.testing import save_random_model, tiny_config

    model_dir = save_random_model(tmp_path / "model", tiny_config(max_position_embeddings=1024, eos_token_ids=(),
                                                                  num_layers=2), seed=4)
    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    text = "In the beginning God created the heaven and the earth. And the earth was without form. "
    prompts = [text[i:] + text[:i] for i in range(0, 40, 10)]
    redis_srv.start()
    outs: dict[int, object] = {}
    with LocalCluster(ClusterConfig(model=str(model_dir), budget="16", k=3, cohorts=2),
                      redis_url=redis_srv.url) as cluster:
        def one(i):
            with SparseSpecClient(cluster.address) as c:
                outs[i] = c.generate(prompts[i], max_tokens=24)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    engine = SpecEngine(model, None, eos_ids=[tokenizer.eos_token_id])
    for i, p in enumerate(prompts):
        ids = tokenizer.encode(p, add_special_tokens=False)
        ar_ids = engine.generate(GenerationRequest(ids, 24, mode="ar")).token_ids
        assert_greedy_equal(model, ids, ar_ids, outs[i].token_ids, f"services cohorts session {i}")
        assert outs[i].metrics["rounds"] > 0 and outs[i].metrics["feeds_sent"] > 0
