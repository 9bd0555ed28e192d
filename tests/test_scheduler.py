"""The verifier's state machine without processes: Scheduler and drafter routing over a fake
DrafterClient that can be told to die, stall or lose its state, and the default CommitLog.

The fake proposes the AR continuation with every third draft wrong, so rounds see accepted,
recovered and bonus tokens; whatever it does, the output must be the verifier's own.
"""

from __future__ import annotations

import time

import pytest

from conftest import random_model
from equality import assert_greedy_equal
from sparsespec.rpc.errors import SessionUnknown
from sparsespec.spec.loop import GenerationRequest, SpecEngine
from sparsespec.spec.transport import DraftReply, DrafterClient, DrafterUnavailable, OpenReply
from verifier_service.routing import RoutingDrafterClient, StaticDirectory
from verifier_service.scheduler import Job, Scheduler

PROMPTS = {f"s{i}": list(range(5 + i, 30 + 2 * i)) for i in range(5)}
MAX_TOKENS = 60


@pytest.fixture(scope="module")
def model():
    return random_model(seed=3, max_context=512)


@pytest.fixture(scope="module")
def truth(model):
    """session -> its AR continuation (prompt + MAX_TOKENS tokens)."""
    engine = SpecEngine(model, None, eos_ids=[])
    return {s: p + engine.generate(GenerationRequest(p, MAX_TOKENS, mode="ar")).token_ids
            for s, p in PROMPTS.items()}


class FakeDrafter(DrafterClient):
    """Holds each session's committed length, as a real drafter does, and checks every Draft's
    base_len against it. `mode`: "ok", "dead" (every call fails), "stall" (calls time out after
    a delay), "amnesia" (forgets every session once, then works)."""

    def __init__(self, truth: dict[str, list[int]], stall_s: float = 0.05):
        self.truth, self.stall_s = truth, stall_s
        self.mode = "ok"
        self.held: dict[str, int] = {}            # session -> committed tokens it holds
        self.calls = {"open": 0, "draft": 0, "reopen": 0, "close": 0}

    def _check_alive(self) -> None:
        if self.mode == "dead":
            raise DrafterUnavailable("fake drafter: dead")
        if self.mode == "stall":
            time.sleep(self.stall_s)
            raise DrafterUnavailable("fake drafter: DEADLINE_EXCEEDED")
        if self.mode == "amnesia":
            self.held.clear()
            self.mode = "ok"

    def open(self, session, tokens, params):
        self._check_alive()
        self.calls["open"] += 1
        self.held[session] = len(tokens)
        return OpenReply()

    def draft(self, session, base_len, append, k, params, summary=None, feed=None):
        self._check_alive()
        self.calls["draft"] += 1
        if base_len == 0:                          # re-open from the whole committed prefix
            self.calls["reopen"] += 1
            self.held[session] = 0
        if session not in self.held:
            raise SessionUnknown(f"session_id: {session!r} is not open")
        have = self.held[session]
        if base_len != have and base_len != 0:
            from sparsespec.spec.drafter import StateMismatch
            raise StateMismatch(f"base_len: {base_len} != {have}")
        n = base_len + len(append)
        self.held[session] = n
        right = self.truth[session][n:n + k]
        drafts = [t if i % 3 != 2 else (t + 1) % 128 for i, t in enumerate(right)]
        drafts += [0] * (k - len(drafts))
        return DraftReply(drafts, None, 0.0)

    def close(self, session):
        self.calls["close"] += 1
        self.held.pop(session, None)


def submit_all(sched: Scheduler, sessions=PROMPTS) -> list[Job]:
    return [sched.submit(Job(s, 1, GenerationRequest(p, MAX_TOKENS, k=4), log_len=len(p)))
            for s, p in sessions.items()]


def wait_all(jobs: list[Job], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for j in jobs:
        while not j.finished:
            assert time.monotonic() < deadline, f"job {j.session} did not finish"
            time.sleep(0.01)
        assert j.error is None, j.error


def wait_tokens(j: Job, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(j.generated) < n:
        assert time.monotonic() < deadline and not j.finished, f"job {j.session} stopped at {len(j.generated)}"
        time.sleep(0.0005)


def check(model, truth, jobs: list[Job]) -> None:
    for j in jobs:
        prompt = PROMPTS[j.session]
        assert_greedy_equal(model, prompt, truth[j.session][len(prompt):], j.generated, j.session)


@pytest.fixture
def run_with(model):
    scheds = []

    def make(drafter: DrafterClient, max_batch: int = 3) -> Scheduler:
        sched = Scheduler(SpecEngine(model, drafter, max_batch=max_batch, eos_ids=[]), max_queue=16)
        sched.start()
        scheds.append(sched)
        return sched
    yield make
    for s in scheds:
        s.stop()


def test_sessions_share_rounds_and_equal_ar(run_with, model, truth):
    fake = FakeDrafter(truth)
    sched = run_with(fake)
    jobs = submit_all(sched)                       # 5 sessions over 3 rows
    wait_all(jobs)
    check(model, truth, jobs)
    assert all(j.result.metrics.rounds > 0 and j.result.metrics.accepted > 0 for j in jobs)
    assert sched.rows() == {"active": 0, "parked": 3, "free": 0}
    assert set(fake.held) <= {j.session for j in jobs} and len(fake.held) <= 3   # evicted rows closed theirs


def test_turns_queued_together_are_started_together(model, truth):
    class Recording(FakeDrafter):
        def open_many(self, calls):
            batches.append(len(calls))
            return super().open_many(calls)

    batches: list[int] = []
    sched = Scheduler(SpecEngine(model, Recording(truth), max_batch=3, eos_ids=[]), max_queue=16)
    jobs = submit_all(sched)                       # 5 turns queued before the loop runs, 3 rows
    sched.start()
    try:
        wait_all(jobs)
    finally:
        sched.stop()
    check(model, truth, jobs)
    assert batches[0] == 3 and sum(batches) == 5   # one start_many for the first three


@pytest.mark.parametrize("fault", ["dead", "stall"])
def test_a_failing_drafter_costs_speed_not_tokens(run_with, model, truth, fault):
    fake = FakeDrafter(truth)
    sched = run_with(fake)
    jobs = submit_all(sched, {"s0": PROMPTS["s0"], "s1": PROMPTS["s1"]})
    wait_tokens(jobs[0], 15)
    fake.mode = fault
    wait_tokens(jobs[0], 30)                       # decoding alone meanwhile
    fake.mode = "ok"                               # it comes back: sessions re-open with base_len 0
    wait_all(jobs)
    check(model, truth, jobs)
    m = jobs[0].result.metrics
    assert m.drafter_failures >= 1 and fake.calls["reopen"] >= 1 and m.ar_steps >= 1


def test_a_drafter_that_lost_its_state_is_reopened(run_with, model, truth):
    fake = FakeDrafter(truth)
    sched = run_with(fake)
    jobs = submit_all(sched, {"s2": PROMPTS["s2"]})
    wait_tokens(jobs[0], 10)
    fake.mode = "amnesia"
    wait_all(jobs)
    check(model, truth, jobs)
    m = jobs[0].result.metrics
    assert m.drafter_failures >= 1 and fake.calls["reopen"] >= 1
    assert m.rounds > m.drafter_failures             # speculation resumed after the re-open


def test_cancel_and_resubmit_a_session(run_with, model, truth):
    sched = run_with(FakeDrafter(truth))
    [j] = submit_all(sched, {"s3": PROMPTS["s3"]})
    assert sched.cancel(j)
    while not j.finished:
        time.sleep(0.001)
    assert j.result.metrics.stop_reason == "aborted" and sched.idle()
    [again] = submit_all(sched, {"s3": PROMPTS["s3"]})   # a retry runs as the first try
    wait_all([again])
    check(model, truth, [again])


def test_routing_rebinds_to_a_live_drafter(model, truth):
    a, b = FakeDrafter(truth), FakeDrafter(truth)
    fakes = {"a:1": a, "b:1": b}
    routing = RoutingDrafterClient(StaticDirectory(["a:1", "b:1"]), fakes.__getitem__, cooldown_s=30,
                                   rebind_every_s=0.0)
    engine = SpecEngine(model, routing, max_batch=1, eos_ids=[])
    sched = Scheduler(engine, max_queue=4)
    sched.start()
    try:
        [j] = submit_all(sched, {"s4": PROMPTS["s4"]})
        wait_tokens(j, 10)
        assert routing.bound("s4") == "a:1"
        a.mode = "dead"                              # the bound drafter dies for good
        wait_all([j])
        check(model, truth, [j])
        assert routing.bound("s4") == "b:1" and b.calls["draft"] > 0   # re-bound, speculating again
        assert j.result.metrics.drafter_failures >= 1
    finally:
        sched.stop()
    assert "s4" not in a.held or a.mode == "dead"


def test_routing_reopens_at_most_every_rebind_interval(truth):
    from sparsespec.spec.sampling import SamplingParams
    fake = FakeDrafter(truth)
    routing = RoutingDrafterClient(StaticDirectory(["a:1"]), lambda a: fake, cooldown_s=0.0, rebind_every_s=30)
    greedy, prompt = SamplingParams(), PROMPTS["s0"]
    routing.draft("s0", 0, prompt, 4, greedy)            # binds and opens
    fake.mode = "dead"
    with pytest.raises(DrafterUnavailable):
        routing.draft("s0", len(prompt), [], 4, greedy)
    with pytest.raises(DrafterUnavailable):
        routing.draft("s0", 0, prompt, 4, greedy)        # the first re-open is tried (and fails)
    fake.mode, before = "ok", dict(fake.calls)
    with pytest.raises(DrafterUnavailable, match="retrying"):
        routing.draft("s0", 0, prompt, 4, greedy)        # within rebind_every_s: not even tried
    assert fake.calls == before
