"""Batched drafting: one forward per draft position over every session a drafter holds.

The drafts of a batched round must be the drafts each session would make alone (the batch only
stacks rows), a session that fails must fail alone, and speculation with batched drafting must
still decode exactly what the verifier decodes alone, in process and through the services.
"""

from __future__ import annotations

import time

import pytest
import torch

import sparsespec.spec.drafter as drafter_mod
from drafter_service.server import DrafterServer
from kvstore.cache.sparse import SparseConfig
from kvstore.cache.stacked import StackedKVCache
from sparsespec.rpc.drafter_client import GrpcDrafterClient
from sparsespec.rpc.errors import DrafterFull, DrafterRejected, SessionUnknown, StateMismatch
from sparsespec.spec.drafter import Drafter, DraftJob, draft_round
from sparsespec.spec.adaptive import AdaptiveConfig
from sparsespec.spec.drafter_host import DrafterHost, DrafterHostConfig, LocalDrafterClient
from sparsespec.spec.loop import GenerationRequest, Run, SpecEngine, Start
from sparsespec.spec.sampling import SamplingParams
from sparsespec.spec.transport import DraftCall, DrafterUnavailable, OpenCall
from tests.equality import assert_greedy_equal

GREEDY = SamplingParams()
POLICIES = ("streaming", "chunk_topk", "snapkv", "full")


def prompts(n: int, vocab: int = 128, seed: int = 3) -> list[list[int]]:
    """Prompts of different lengths, so the batch mixes prefill phases, selections and tails."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (20 + 37 * i,), generator=g).tolist() for i in range(n)]


@pytest.fixture
def stacked_sizes(monkeypatch):
    """Records how many sessions each batched drafter forward stacked."""
    sizes: list[int] = []

    class Recording(StackedKVCache):
        def __init__(self, caches):
            sizes.append(len(caches))
            super().__init__(caches)

    monkeypatch.setattr(drafter_mod, "StackedKVCache", Recording)
    return sizes


def solo_and_batched(model, configs, prompts_, k_of):
    """The same sessions drafted one by one and in one round: (solo drafts, batched jobs)."""
    def fresh():
        ds = []
        for cfg, p in zip(configs, prompts_):
            d = Drafter(model, cfg, 512)
            d.start(p)
            ds.append(d)
        return ds

    solo = []
    for i, d in enumerate(fresh()):
        solo.append(d.draft(k_of(i), GREEDY).tokens)
    jobs = [DraftJob(d, k_of(i), GREEDY) for i, d in enumerate(fresh())]
    draft_round(jobs)
    return solo, jobs


def test_a_batched_round_drafts_what_each_session_drafts_alone(tiny_model, stacked_sizes):
    configs = [SparseConfig(policy=POLICIES[i % 4], budget=None if POLICIES[i % 4] == "full" else 24,
                            reselect_interval=4) for i in range(6)]
    solo, jobs = solo_and_batched(tiny_model, configs, prompts(6), lambda i: 1 + i % 4)  # k 1..4
    assert [j.error for j in jobs] == [None] * 6
    assert [j.result.tokens for j in jobs] == solo
    assert max(stacked_sizes) == 4        # k=1 sessions need no forward; k=4 ones step alone last


def test_the_next_round_syncs_every_session_in_one_forward(tiny_model, stacked_sizes):
    ps = prompts(4)
    config = SparseConfig(policy="streaming", budget=24, reselect_interval=4)

    def fresh():
        ds = []
        for p in ps:
            d = Drafter(tiny_model, config, 512)
            d.start(p)
            ds.append(d)
        return ds

    solo, batched = fresh(), fresh()
    first = [d.draft(3, GREEDY).tokens for d in solo]
    jobs = [DraftJob(d, 3, GREEDY) for d in batched]
    draft_round(jobs)
    assert [j.result.tokens for j in jobs] == first
    # Accept 0, 1, 2, 3 drafts, then a recovered/bonus token: the first three reuse their cached
    # drafts and forward one token each (together); the last forwards d3 and its bonus.
    appends = [first[i][:i] + [7] if i < 3 else first[i] + [7] for i in range(4)]
    stacked_sizes.clear()
    nxt = [DraftJob(d, 3, GREEDY, sync=(len(p), a)) for d, p, a in zip(batched, ps, appends)]
    draft_round(nxt)
    assert all(j.error is None for j in nxt)
    assert sorted(stacked_sizes[:2]) == [1, 3]
    for d, p, a, n in zip(solo, ps, appends, nxt):
        d.sync(len(p), a)
        assert d.draft(3, GREEDY).tokens == n.result.tokens


def test_one_failing_session_fails_alone(tiny_model):
    host = DrafterHost(tiny_model, DrafterHostConfig(SparseConfig("chunk_topk", 24, reselect_interval=4), 512))
    ps = prompts(5)
    for i, p in enumerate(ps):
        host.open(f"s{i}", p, GREEDY)
    alone = [host.draft(f"s{i}", len(p), [], 3, GREEDY).tokens for i, p in enumerate(ps)]
    calls = [DraftCall(f"s{i}", len(p), [], 3, GREEDY) for i, p in enumerate(ps)]
    calls[1] = DraftCall("s1", len(ps[1]) + 5, [], 3, GREEDY)           # wrong base_len
    calls[2] = DraftCall("s2", len(ps[2]), [], 3, GREEDY, summary=b"\x00junk")   # malformed summary
    calls[3] = DraftCall("s3", len(ps[3]), [10_000], 3, GREEDY)          # outside the vocabulary
    calls.append(DraftCall("nobody", 4, [], 3, GREEDY))                  # never opened
    calls.append(DraftCall("s0", len(ps[0]), [], 3, GREEDY))             # twice in one round
    out = host.draft_many(calls)
    assert out[0].tokens == alone[0] and out[4].tokens == alone[4]
    assert isinstance(out[1], StateMismatch) and "base_len" in str(out[1])
    assert "summary" in str(out[2]) and "append" in str(out[3])
    assert isinstance(out[5], SessionUnknown)
    assert "session_id" in str(out[6]) and "twice" in str(out[6])
    # A refused call changed nothing: each session drafts on from where it was.
    for i in (1, 2, 3):
        assert host.draft(f"s{i}", len(ps[i]), [], 3, GREEDY).tokens == alone[i]
    # In process the same refusals reach the round loop as DRAFTER_FAILURES.
    local = LocalDrafterClient(host).draft_many([calls[3], DraftCall("s4", len(ps[4]), [], 3, GREEDY)])
    assert isinstance(local[0], DrafterRejected) and local[1].tokens == alone[4]


def test_a_session_past_its_context_limit_fails_alone(tiny_model):
    host = DrafterHost(tiny_model, DrafterHostConfig(SparseConfig("streaming", 24, reselect_interval=4), 64))
    long, short = list(range(1, 60)), list(range(1, 20))
    host.open("long", long, GREEDY)
    host.open("short", short, GREEDY)
    out = host.draft_many([DraftCall("long", len(long), [5] * 6, 2, GREEDY),   # past max_context 64
                           DraftCall("short", len(short), [5], 2, GREEDY)])
    assert "append" in str(out[0]) and len(out[1].tokens) == 2


class FailsOneSession(LocalDrafterClient):
    """Fails one session's draft in round `at` (a fake drafter that loses one session)."""

    def __init__(self, host, session_index: int, at: int):
        super().__init__(host)
        self.victim, self.at, self.rounds, self.batch_sizes = session_index, at, 0, []

    def draft_many(self, calls):
        self.rounds += 1
        self.batch_sizes.append(len(calls))
        results = super().draft_many(calls)
        if self.rounds == self.at:
            victim = sorted(c.session for c in calls)[self.victim]
            i = next(i for i, c in enumerate(calls) if c.session == victim)
            self.host.close(victim)
            results[i] = DrafterUnavailable("injected")
        return results


@pytest.mark.parametrize("policy,budget,k", [("chunk_topk", 32, 4), ("streaming", 16, 2), ("snapkv", 48, 6)])
def test_engine_with_batched_drafting_equals_ar(tiny_model, policy, budget, k):
    ps = prompts(4)
    reqs = [GenerationRequest(p, 24 + 8 * i, k=k) for i, p in enumerate(ps)]
    ar = SpecEngine(tiny_model, None).generate_many([GenerationRequest(p, r.max_tokens, mode="ar")
                                                      for p, r in zip(ps, reqs)])
    host = DrafterHost(tiny_model, DrafterHostConfig(SparseConfig(policy, budget, reselect_interval=8), 512))
    client = FailsOneSession(host, session_index=1, at=3)
    out = SpecEngine(tiny_model, client).generate_many(reqs)
    for p, a, o in zip(ps, ar, out):
        assert_greedy_equal(tiny_model, p, a.token_ids, o.token_ids, f"{policy} B={budget} k={k}")
    assert sum(o.metrics.drafter_failures for o in out) == 1
    assert max(client.batch_sizes) == 4 and client.rounds < sum(o.metrics.rounds for o in out)


def test_draft_batch_over_grpc(tiny_model):
    host = DrafterHost(tiny_model, DrafterHostConfig(SparseConfig("chunk_topk", 24, reselect_interval=4), 512))
    ps = prompts(3)
    server = DrafterServer(host).start()
    try:
        with GrpcDrafterClient(server.address) as client:
            opened = client.draft_many([DraftCall(f"g{i}", 0, p, 3, GREEDY) for i, p in enumerate(ps)])
            alone = [Drafter(tiny_model, host.config.sparse, host.config.capacity) for _ in ps]
            for d, p, r in zip(alone, ps, opened):
                d.start(p)
                assert r.tokens == d.draft(3, GREEDY).tokens
            out = client.draft_many([DraftCall("g0", len(ps[0]), [opened[0].tokens[0], 9], 2, GREEDY),
                                     DraftCall("g1", len(ps[1]) + 1, [], 2, GREEDY),
                                     DraftCall("g2", len(ps[2]), [1], 99, GREEDY)])
            assert len(out[0].tokens) == 2
            assert isinstance(out[1], StateMismatch) and "base_len" in str(out[1])
            assert isinstance(out[2], DrafterRejected) and "k" in str(out[2])
            assert client.draft_many([]) == []
        server.stop()
        with GrpcDrafterClient(server.address, timeout_s=0.5) as client:   # the whole call fails
            gone = client.draft_many([DraftCall("g0", 1, [], 2, GREEDY), DraftCall("g1", 1, [], 2, GREEDY)])
            assert all(isinstance(e, DrafterUnavailable) for e in gone)
    finally:
        server.stop()


class SlowReopens(LocalDrafterClient):
    """A drafter whose re-opens (base_len 0, a prefill) take 0.3 s."""

    def draft_many(self, calls):
        if any(c.base_len == 0 for c in calls):
            time.sleep(0.3)
        return super().draft_many(calls)


def test_a_reopen_in_the_round_does_not_count_against_the_others_draft_time(tiny_model):
    ps = prompts(2)
    host = DrafterHost(tiny_model, DrafterHostConfig(SparseConfig("streaming", 16), 512))
    engine = SpecEngine(tiny_model, SlowReopens(host))
    runs = [engine.start(GenerationRequest(p, 8, k=2), row) for row, p in enumerate(ps)]
    runs[1].drafter_base = 0          # its drafter state is gone: this round re-opens it
    host.close(runs[1].session)
    engine.step(runs)
    assert runs[1].metrics.draft_s >= 0.3
    assert runs[0].metrics.draft_s < 0.3, runs[0].metrics.draft_s   # what adaptive k weighs


def test_adaptive_k_does_not_take_a_sessions_open_for_its_draft_cost(tiny_model):
    """A session's first round opens its drafter session (0.3 s here; a fed drafter's first
    selection, or a prefill): adaptive k must not read that as the price of a draft token, or
    it switches speculation off in the first round (measured: 104 of 144 steps plain at 4K
    where speculation paid 1.22x)."""
    host = DrafterHost(tiny_model, DrafterHostConfig(SparseConfig("streaming", 16), 512))
    engine = SpecEngine(tiny_model, SlowReopens(host))
    run = engine.start(GenerationRequest(prompts(1)[0], 16, k=2, adaptive=AdaptiveConfig(k_max=4)), 0)
    while run.metrics.ar_steps < run.ctrl.cfg.calibrate:
        engine.step([run])              # the plain steps that calibrate t_ar
    # As if an AR step took 0.1 s: a tiny model's measured one is a few ms, and on a loaded CI
    # worker one noisy verify against it could switch speculation off whatever the open cost.
    # At 0.1 s no k pays if the 0.3 s open is priced as draft time, and every k pays if it is not.
    run.ctrl.t_ar = 0.1
    run.drafter_base = 0                # as a fed drafter's first round: it opens the session
    host.close(run.session)
    engine.step([run])                  # the open and the first drafts
    assert run.metrics.rounds == 1 and run.metrics.draft_s >= 0.3
    assert run.ctrl.draft_at == {} and not run.ctrl.off
    engine.step([run])
    assert len(run.ctrl.draft_at) == 1 and max(run.ctrl.draft_at.values()) < 0.1


def test_adaptive_k_prices_a_round_by_its_wall_time(tiny_model, monkeypatch):
    """What surrounds the drafter call (a fed drafter's feed, 50 ms here; the acceptance, the
    commit) is part of what a round costs: priced by the drafter's time alone, speculation looked
    17-27 ms cheaper a round than it was (of ~300 ms at S = 1, 4K) and losing sessions stayed on."""
    host = DrafterHost(tiny_model, DrafterHostConfig(SparseConfig("streaming", 16), 512))
    engine = SpecEngine(tiny_model, LocalDrafterClient(host))
    feed_for = engine._feed_for

    def slow_feed(r, k):
        time.sleep(0.05)
        return feed_for(r, k)

    monkeypatch.setattr(engine, "_feed_for", slow_feed)
    run = engine.start(GenerationRequest(prompts(1)[0], 16, k=2, adaptive=AdaptiveConfig(k_max=4)), 0)
    while run.metrics.rounds < 2:
        engine.step([run])
        run.ctrl.off = False    # 50 ms a round loses at once (it is off after one round): keep it drafting
    assert run.ctrl.draft_at and min(run.ctrl.draft_at.values()) >= 0.05, run.ctrl.draft_at


def test_a_session_switched_off_rides_a_batch_that_drafts(tiny_model):
    """The verify of a round is k + 1 wide if any row drafts, so a plain row in it pays that
    width for one token: a session whose adaptive k switched speculation off drafts with the
    others instead (measured before: adaptive at 8 x 4K 0.75x AR in mixed batches), and plain
    steps are taken only when no row drafts."""
    ps = prompts(2)
    host = DrafterHost(tiny_model, DrafterHostConfig(SparseConfig("streaming", 16), 512))
    engine = SpecEngine(tiny_model, LocalDrafterClient(host))
    adaptive = AdaptiveConfig(k_max=4)
    runs = [engine.start(GenerationRequest(p, 24, k=2, adaptive=adaptive), row) for row, p in enumerate(ps)]
    c = adaptive.calibrate
    for _ in range(c):
        engine.step(runs)                                   # both calibrate: plain
    runs[1].ctrl.off, runs[1].ctrl._plain_since_probe = True, 0
    engine.step(runs)
    assert [r.metrics.rounds for r in runs] == [1, 1] and [r.metrics.ar_steps for r in runs] == [c, c]
    for r in runs:
        r.ctrl.off, r.ctrl._plain_since_probe = True, 0    # both off: a plain batch
    engine.step(runs)
    assert [r.metrics.ar_steps for r in runs] == [c + 1, c + 1]


class SlowDrafts(LocalDrafterClient):
    """A drafter 200 ms slower a round than a step of the tiny verifier (a few ms; tens on a
    loaded CI worker): a loser even if every draft were accepted."""

    def draft_many(self, calls):
        time.sleep(0.2)
        return super().draft_many(calls)


def test_a_session_starts_from_what_the_last_one_in_its_regime_learned(tiny_model):
    """The round a session spends learning that speculation loses costs its whole batch (at
    S = 8, 4K ~3 AR steps: adaptive ran 0.91x AR where the floor is 0.95x). The engine keeps the
    last verdict per regime (batch width, context) and the next session there starts from it;
    a session in another regime learns its own. Every output is still AR's."""
    ps = [p[:20] for p in prompts(3)]
    ar = SpecEngine(tiny_model, None).generate_many([GenerationRequest(p, 16, mode="ar") for p in ps])
    host = DrafterHost(tiny_model, DrafterHostConfig(SparseConfig("streaming", 16), 512))
    engine = SpecEngine(tiny_model, SlowDrafts(host))
    req = [GenerationRequest(p, 16, k=2, adaptive=AdaptiveConfig(k_max=4)) for p in ps]
    first, = engine.generate_many([req[0]])
    second, = engine.generate_many([req[1]])     # the same regime: known to lose, so plain throughout
    pair = engine.generate_many([req[0], req[2]])   # a batch of 2: a regime of its own
    assert first.metrics.rounds >= 1 and second.metrics.rounds == 0
    assert (first.metrics.adaptive_seeded, second.metrics.adaptive_seeded) == (0, 1)
    assert all(o.metrics.rounds >= 1 for o in pair)
    for i, o in zip((0, 1, 0, 2), [first, second] + pair):
        assert_greedy_equal(tiny_model, ps[i], ar[i].token_ids, o.token_ids, "seeded adaptive k")


def test_adaptive_sessions_of_different_lengths_in_one_batch_equal_ar(tiny_model):
    """The batch's k (the median of what adaptive runs ask), sessions switching off and riding
    along, with prompts and lengths that differ: every output is still AR's."""
    ps = prompts(4)
    adaptive = AdaptiveConfig(k_max=6)
    reqs = [GenerationRequest(p[:12 + 4 * i], 20 + 6 * i, k=2 + i, adaptive=adaptive) for i, p in enumerate(ps)]
    ar = SpecEngine(tiny_model, None).generate_many([GenerationRequest(r.prompt_ids, r.max_tokens, mode="ar")
                                                      for r in reqs])
    host = DrafterHost(tiny_model, DrafterHostConfig(SparseConfig("streaming", 16), 512))
    out = SpecEngine(tiny_model, LocalDrafterClient(host)).generate_many(reqs)
    for r, a, o in zip(reqs, ar, out):
        assert_greedy_equal(tiny_model, list(r.prompt_ids), a.token_ids, o.token_ids, "adaptive batch")
    assert sum(o.metrics.rounds for o in out) > 0 and sum(o.metrics.ar_steps for o in out) > 0


# --- sessions that arrive together: one prefill forward per prompt length ----------------------

def counting_forwards(engine) -> list[int]:
    """Records the rows of every verifier forward of more than one token (a prefill)."""
    rows: list[int] = []
    forward = engine.verifier._forward

    def counted(rs, ids, last_only):
        if ids.shape[1] > 1 and last_only:
            rows.append(len(rs))
        return forward(rs, ids, last_only)
    engine.verifier._forward = counted
    return rows


def test_sessions_arriving_together_share_their_prefill_forwards(tiny_model, stacked_sizes):
    g = torch.Generator().manual_seed(9)
    ps = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (40, 40, 77, 40, 77)]
    alone = [SpecEngine(tiny_model, None).generate(GenerationRequest(p, 24, mode="ar")).token_ids for p in ps]
    host = DrafterHost(tiny_model, DrafterHostConfig(SparseConfig("chunk_topk", 24, reselect_interval=4), 512))
    engine = SpecEngine(tiny_model, LocalDrafterClient(host))
    prefills = counting_forwards(engine)
    out = engine.generate_many([GenerationRequest(p, 24, k=3) for p in ps])
    assert sorted(prefills) == [2, 3]             # the verifier: one forward per prompt length
    assert sorted(stacked_sizes[:2]) == [2, 3]    # the drafter's own prefills: the same
    for p, a, o in zip(ps, alone, out):
        assert_greedy_equal(tiny_model, p, a, o.token_ids, "arrived together")
        assert o.metrics.accepted > 0


def test_a_start_that_fails_fails_alone(tiny_model):
    ps = prompts(3)
    host = DrafterHost(tiny_model, DrafterHostConfig(SparseConfig("streaming", 16, reselect_interval=4), 512))
    engine = SpecEngine(tiny_model, LocalDrafterClient(host), max_batch=3)
    out = engine.start_many([Start(GenerationRequest(ps[0], 16, k=2), 0),
                             Start(GenerationRequest(ps[1], 16, k=2), 99),       # no such cache row
                             Start(GenerationRequest(ps[2], 16, k=2), 2),
                             Start(GenerationRequest(ps[1], 16, k=2), 0)])       # row 0 is taken
    assert isinstance(out[0], Run) and isinstance(out[2], Run) and isinstance(out[1], IndexError)
    assert "row" in str(out[3]) and "taken" in str(out[3])
    assert host.load() == 2                       # the failed start opened no drafter session
    runs = [out[0], out[2]]
    while any(not r.done for r in runs):
        engine.step([r for r in runs if not r.done])
    ar = SpecEngine(tiny_model, None)
    for r, p in zip(runs, (ps[0], ps[2])):
        assert_greedy_equal(tiny_model, p, ar.generate(GenerationRequest(p, 16, mode="ar")).token_ids,
                            r.generated, "beside a failed start")


def test_one_bad_open_fails_alone_and_writes_nothing(tiny_model):
    cfg = SparseConfig("chunk_topk", 24, reselect_interval=4)
    one = DrafterHostConfig(cfg, 512)
    cost = DrafterHost(tiny_model, one).cost.device_bytes
    host = DrafterHost(tiny_model, DrafterHostConfig(cfg, 512, memory_budget_bytes=3 * cost))
    ps = prompts(3)
    out = host.open_many([OpenCall("a", ps[0], GREEDY), OpenCall("bad", [1, 10_000], GREEDY),
                          OpenCall("empty", [], GREEDY), OpenCall("a", ps[1], GREEDY),
                          OpenCall("b", ps[1], GREEDY), OpenCall("c", ps[2], GREEDY),
                          OpenCall("full", ps[2], GREEDY)])
    assert "tokens" in str(out[1]) and "vocabulary" in str(out[1])
    assert "tokens" in str(out[2]) and "empty" in str(out[2])
    assert "session_id" in str(out[3]) and "twice" in str(out[3])
    assert isinstance(out[6], DrafterFull) and "memory_budget_bytes" in str(out[6])
    assert host.load() == 3 and {"bad", "empty", "full"}.isdisjoint(host._sessions)
    # Those that opened together draft what each would have drafted opened alone.
    for name, p in (("a", ps[0]), ("b", ps[1]), ("c", ps[2])):
        solo = DrafterHost(tiny_model, one)
        solo.open(name, p, GREEDY)
        assert host.draft(name, len(p), [], 3, GREEDY).tokens == solo.draft(name, len(p), [], 3, GREEDY).tokens
    # In process the refusals reach the round loop as DRAFTER_FAILURES, as over gRPC.
    local = LocalDrafterClient(host).open_many([OpenCall("x", [10_000], GREEDY)])
    assert isinstance(local[0], DrafterRejected)
