"""Hostile use of a real cluster must lose nothing and break nothing (issue #11).

Each test is the regression test of one failure found by trying the services as a hostile user
would: concurrent turns of one session, refused requests that still wrote to Redis, clients that
drop their stream, a Redis restart, a dead round loop. Real redis-server, real service
processes, real gRPC on 127.0.0.1; the in-process Scheduler tests at the end pin the same rules
without processes.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import redis

from equality import assert_greedy_equal
from kvstore.coord.sessions import RedisUnavailable, SessionBusy, SessionStore
from sparsespec.client import GenerationError, SparseSpecClient
from sparsespec.cluster import ClusterConfig, LocalCluster, spawn_service
from sparsespec.models import load_model
from sparsespec.models.testing import save_random_model, tiny_config
from sparsespec.redis_server import RedisServer, find_redis_server
from sparsespec.rpc.sparsespec.v1 import generation_pb2 as pb
from sparsespec.rpc.sparsespec.v1 import generation_pb2_grpc as pb_grpc
from sparsespec.spec.loop import GenerationRequest, SpecEngine
from verifier_service.scheduler import CommitLog, Job, Scheduler

CONTEXT = 2048
PROMPT = list(range(3, 40))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = tiny_config(max_position_embeddings=CONTEXT, eos_token_ids=(), num_layers=3)
    return save_random_model(tmp_path_factory.mktemp("reliability") / "model", cfg, seed=11)


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir).eval()


@pytest.fixture(scope="module")
def ar(model):
    """AR decoding in process: what every service output must equal."""
    engine = SpecEngine(model, None, eos_ids=[])

    def check(context: list[int], tokens: list[int], label: str = "") -> None:
        expected = engine.generate(GenerationRequest(context, len(tokens), mode="ar")).token_ids
        assert_greedy_equal(model, context, expected, tokens, label)
    return check


@pytest.fixture(scope="module")
def cluster(model_dir, redis_srv):
    redis_srv.start()
    with LocalCluster(ClusterConfig(model=str(model_dir), policy="streaming", budget="32", k=4,
                                    lease_ms=1500), redis_url=redis_srv.url) as c:
        yield c


@pytest.fixture
def store(cluster):
    return SessionStore(cluster.redis_url)


def session_keys(redis_url: str, session: str) -> list[bytes]:
    return redis.Redis.from_url(redis_url).keys(f"*{{{session}}}*")


def start_verifier(model_dir, redis_url: str, *args, env: dict | None = None):
    proc = spawn_service("verifier-x", "verifier_service",
                         ["--model", model_dir, "--redis", redis_url, "--lease-ms", 1500, *args], env=env)
    assert proc.wait_listening(120), "\n".join(proc.output[-20:])
    return proc


def stub(address: str) -> pb_grpc.GenerationStub:
    return pb_grpc.GenerationStub(grpc.insecure_channel(address))


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- 1. concurrent turns of one session ----------------------------------------------------

def test_concurrent_turns_of_one_session_run_one_and_refuse_the_rest(cluster, store, ar):
    with SparseSpecClient(cluster.address) as c:
        first = c.generate(PROMPT, max_tokens=8, mode="ar")
    sid = first.session_id
    outcomes, barrier = [None] * 6, threading.Barrier(6)

    def turn(i: int) -> None:
        with SparseSpecClient(cluster.address, reconnect_timeout_s=10) as c:
            c.model_info()                      # connected: the turns arrive together
            barrier.wait()
            t0 = time.monotonic()
            try:
                outcomes[i] = ("ok", c.generate([50 + i], session_id=sid, max_tokens=300))
            except GenerationError as e:
                outcomes[i] = ("refused", e.code, e.message, time.monotonic() - t0)

    threads = [threading.Thread(target=turn, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done = [o[1] for o in outcomes if o[0] == "ok"]
    refused = [o for o in outcomes if o[0] == "refused"]
    assert done and refused and len(done) + len(refused) == 6, outcomes
    for _, code, details, waited in refused:        # refused at once, never left hanging
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "session_id" in details and waited < 5, refused
    rec = store.get(sid)
    assert len(rec.turns) == 1 + len(done), rec.turns           # each user token recorded once
    ctx = store.context(sid)
    for t, d in zip(rec.turns[1:], sorted(done, key=lambda d: ctx.index(d.token_ids[0], len(PROMPT)))):
        assert len(ctx[t.user_start:t.gen_start]) == 1
        assert ctx[t.gen_start:t.gen_start + len(d.token_ids)] == d.token_ids
        ar(ctx[:t.gen_start], d.token_ids, "the turn that ran")
    # the verifier still serves: a new session and a next turn of this one
    with SparseSpecClient(cluster.address, reconnect_timeout_s=10) as c:
        fresh = c.generate(PROMPT[:10], max_tokens=16)
        ar(PROMPT[:10], fresh.token_ids, "after the storm")
        again = c.generate([99], session_id=sid, max_tokens=8)
        ar(ctx + [99], again.token_ids, "next turn")
    assert all(v.alive() for v in cluster.verifiers)


@pytest.fixture(scope="module")
def second_verifier(cluster, model_dir):
    other = start_verifier(model_dir, cluster.redis_url)
    yield other
    other.stop()


def test_concurrent_turns_across_two_verifiers(cluster, second_verifier, store, ar):
    """Storms of next turns spread over both verifiers: the losers are refused, never handed
    the winner's tokens (a StaleEpoch retried as a resume used to re-attach to the winner)."""
    addresses = [cluster.address, second_verifier.address]
    for storm in range(4):
        with SparseSpecClient(addresses[storm % 2]) as c:
            sid = c.generate(PROMPT, max_tokens=4, mode="ar").session_id
        time.sleep(1.6)   # past lease_ms: a lease still held after the turn cannot shield the race
        outcomes, barrier = [None] * 4, threading.Barrier(4)

        def turn(i: int) -> None:
            with SparseSpecClient([addresses[i % 2], addresses[1 - i % 2]], reconnect_timeout_s=10) as c:
                c.model_info()
                barrier.wait()
                try:
                    outcomes[i] = c.generate([60 + i], session_id=sid, max_tokens=200, mode="ar")
                except GenerationError as e:
                    outcomes[i] = e

        threads = [threading.Thread(target=turn, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        ok = {i: o for i, o in enumerate(outcomes) if not isinstance(o, GenerationError)}
        bad = [o for o in outcomes if isinstance(o, GenerationError)]
        rec, ctx = store.get(sid), store.context(sid)
        assert ok and len(rec.turns) == 1 + len(ok), (outcomes, rec.turns)
        assert all(e.code == grpc.StatusCode.FAILED_PRECONDITION for e in bad), bad
        for t in rec.turns[1:]:                          # each recorded turn is one client's, whole
            o = ok[ctx[t.user_start] - 60]
            assert ctx[t.gen_start:t.gen_start + len(o.token_ids)] == o.token_ids
            ar(ctx[:t.gen_start], o.token_ids, f"storm {storm}")


def test_next_turn_on_the_other_verifier_right_after_a_turn(cluster, second_verifier, store, ar):
    """A finished turn releases its lease: the next turn may start anywhere at once."""
    with SparseSpecClient(cluster.address) as c:
        first = c.generate(PROMPT, max_tokens=8, mode="ar")
    with SparseSpecClient(second_verifier.address, reconnect_timeout_s=1) as c:
        nxt = c.generate([61], session_id=first.session_id, max_tokens=8, mode="ar")
    ar(PROMPT + first.token_ids + [61], nxt.token_ids, "next turn elsewhere")
    assert len(store.get(first.session_id).turns) == 2


def test_sdk_with_a_dead_verifier_first_starts_new_sessions_and_next_turns(cluster, store, ar):
    """A turn whose first try failed before any verifier registered it is started by the retry
    (it was never created: NOT_FOUND looped; a next turn got the previous turn's output)."""
    from sparsespec.redis_server import free_port
    dead = f"127.0.0.1:{free_port()}"
    with SparseSpecClient([dead, cluster.address], reconnect_timeout_s=10) as c:
        first = c.generate(PROMPT, max_tokens=8, mode="ar", session_id="dead-first")
        assert first.reconnects >= 1
        c._current = 0                                   # the next turn tries the dead one first too
        nxt = c.generate([50, 51], max_tokens=12, mode="ar", session_id="dead-first")
    ar(PROMPT, first.token_ids, "new session")
    ar(PROMPT + first.token_ids + [50, 51], nxt.token_ids, "next turn")
    rec = store.get("dead-first")
    assert len(rec.turns) == 2 and store.read("dead-first") == nxt.token_ids


# --- 2. refused requests write nothing -------------------------------------------------------

def test_over_long_prompt_and_turn_are_refused_without_a_write(cluster, store, ar):
    s = stub(cluster.address)
    with pytest.raises(grpc.RpcError) as e:
        list(s.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * (CONTEXT + 10)), max_tokens=4,
                                           session_id="too-long")))
    assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert session_keys(cluster.redis_url, "too-long") == []          # nothing left behind, TTL or not
    with SparseSpecClient(cluster.address) as c:
        sid = c.generate(PROMPT, max_tokens=8, mode="ar").session_id
        before = (store.get(sid).turns, store.context(sid))
        with pytest.raises(GenerationError) as e:
            c.generate([7] * (CONTEXT - 20), session_id=sid, max_tokens=4)
        assert e.value.code == grpc.StatusCode.OUT_OF_RANGE
        assert (store.get(sid).turns, store.context(sid)) == before   # the session is not poisoned
        after = c.generate([8, 9], session_id=sid, max_tokens=12)
        ar(before[1] + [8, 9], after.token_ids, "the next turn after a refused one")


def test_admission_refusal_writes_nothing_and_a_retry_is_a_first_try(cluster, model_dir, store, ar):
    v = start_verifier(model_dir, cluster.redis_url, "--max-batch", 1, "--max-queue", 1)
    try:
        s = stub(v.address)
        hog = s.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), max_tokens=1800, mode="ar",
                                            session_id="hog"))
        next(hog)                                   # it runs and holds the only slot
        with pytest.raises(grpc.RpcError) as e:
            list(s.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT[:9]), max_tokens=10,
                                               mode="ar", session_id="late")))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert session_keys(cluster.redis_url, "late") == []
        assert s.Abort(pb.AbortRequest(session_id="hog")).aborted
        wait_for(lambda: store.get("hog").state == "aborted", 10, "the aborted turn to end")
        with SparseSpecClient(v.address) as c:
            again = c.generate(PROMPT[:9], session_id="late", max_tokens=10, mode="ar")
        assert store.context("late") == PROMPT[:9] + again.token_ids    # the prompt stored once
        ar(PROMPT[:9], again.token_ids, "retry after RESOURCE_EXHAUSTED")
    finally:
        v.stop()


# --- 3. a client that drops its stream frees its row ----------------------------------------

def test_dropped_stream_frees_its_row(cluster, model_dir, store, ar):
    v = start_verifier(model_dir, cluster.redis_url, "--max-batch", 1)
    try:
        s = stub(v.address)
        call = s.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), max_tokens=1900, mode="ar",
                                             session_id="dropped"))
        next(call)
        call.cancel()                                # the client goes away mid-generation
        wait_for(lambda: store.get("dropped").state == "aborted", 10, "the dropped turn to be cancelled")
        assert store.get("dropped").generated_len < 1900
        t0 = time.monotonic()
        with SparseSpecClient(v.address) as c:
            out = c.generate(PROMPT[:12], max_tokens=16, mode="ar")
        ar(PROMPT[:12], out.token_ids, "after a dropped client")
        assert time.monotonic() - t0 < 10
        # what the dropped turn committed is durable and is a prefix of its AR output
        gen = store.read("dropped")
        ar(PROMPT, gen, "the dropped turn's durable prefix")
    finally:
        v.stop()


# --- 4. Redis restarts: committed stays committed --------------------------------------------

@pytest.fixture
def durable_cluster(model_dir, tmp_path):
    exe = find_redis_server()
    if exe is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    srv = RedisServer(exe, persistence="everysec", dir=str(tmp_path / "redis"))
    srv.start()
    c = LocalCluster(ClusterConfig(model=str(model_dir), policy="streaming", budget="32", k=4, lease_ms=1500),
                     redis_url=srv.url).start()
    try:
        yield c, srv
    finally:
        c.stop()
        srv.close()


def test_redis_restart_mid_stream_loses_nothing(durable_cluster, ar):
    cluster, srv = durable_cluster
    with SparseSpecClient(cluster.address) as c:
        finished = c.generate(PROMPT[:20], max_tokens=24)        # finished before the outage
        chunks, err = [], []

        def run():
            try:
                for chunk in c.stream(PROMPT, max_tokens=1200, session_id="through-outage"):
                    chunks.append(chunk)
            except Exception as e:  # noqa: BLE001 - the test reads it
                err.append(e)

        t = threading.Thread(target=run)
        t.start()
        wait_for(lambda: sum(len(ch.token_ids) for ch in chunks) >= 50, 60, "tokens before the outage")
        srv.stop()                                               # SIGTERM: a restart
        time.sleep(2.0)                                          # longer than the lease
        srv.start()
        t.join(120)
    assert not err, err
    tokens = [tok for ch in chunks for tok in ch.token_ids]
    assert len(tokens) == 1200 and chunks[-1].finished
    ar(PROMPT, tokens, "through a Redis restart")
    store = SessionStore(srv.url)
    assert store.read("through-outage") == tokens               # every committed token survived
    assert store.read(finished.session_id) == finished.token_ids


def test_resume_of_a_session_redis_lost_is_not_found(cluster):
    with SparseSpecClient(cluster.address) as c:
        done = c.generate(PROMPT[:15], max_tokens=8, mode="ar")
    redis.Redis.from_url(cluster.redis_url).delete(*session_keys(cluster.redis_url, done.session_id))
    with pytest.raises(grpc.RpcError) as e:
        list(stub(cluster.address).Generate(pb.GenerateRequest(session_id=done.session_id, resume=True)))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND             # the log is the truth, not memory


# --- 5. a dead round loop is a dead service --------------------------------------------------

def test_verifier_whose_round_loop_dies_exits_and_the_sdk_moves_on(cluster, model_dir, ar):
    """... and an HTTP gateway in front of it only (in process) stops answering /health 200."""
    import json
    import urllib.error
    import urllib.request

    from sparsespec.gateway import GatewayConfig, GatewayThread

    def health(url: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(url + "/health", timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    crashy = start_verifier(model_dir, cluster.redis_url, env={"SPARSESPEC_FAILPOINTS": "scheduler.round=30"})
    gw = GatewayThread(GatewayConfig(model=str(model_dir), verifiers=(crashy.address,)), tokenizer=object())
    try:
        gw.start()
        assert health(gw.url)[0] == 200
        with SparseSpecClient([crashy.address, cluster.address], reconnect_timeout_s=30) as c:
            out = c.generate(PROMPT, max_tokens=200)
        crashy.popen.wait(20)
        assert crashy.popen.returncode == 3, "\n".join(crashy.output[-20:])
        assert any("round scheduler died" in line for line in crashy.output)
        assert out.reconnects >= 1
        ar(PROMPT, out.token_ids, "resumed on the live verifier")
        status, body = health(gw.url)
        assert status == 503 and body["status"] == "unavailable" and body["reason"] == "no verifier is serving", body
    finally:
        gw.stop()
        crashy.kill()


# --- the same rules in process: Scheduler with the default CommitLog -------------------------

class FlakyLog(CommitLog):
    """A commit log that can be made unreachable (Redis down) and records every append."""

    def __init__(self):
        self.down = False
        self.appends: dict[str, list[int]] = {}
        self.starts: dict[str, int] = {}

    def _reach(self):
        if self.down:
            raise RedisUnavailable("redis: down for the test")

    def append(self, session, epoch, expected_len, tokens):
        self._reach()
        log = self.appends.setdefault(session, [])
        start = self.starts.setdefault(session, expected_len)
        assert start + len(log) == expected_len, "appends in order, none repeated"
        log.extend(tokens)
        return expected_len + len(tokens)

    def renew(self, session, epoch):
        self._reach()

    def ping(self):
        self._reach()

    def finish_turn(self, session, epoch, result):
        self._reach()


@pytest.fixture
def scheduler(model):
    log = FlakyLog()
    sched = Scheduler(SpecEngine(model, None, max_batch=2, eos_ids=[]), log, max_queue=8, retry_log_s=0.02)
    sched.start()
    yield sched, log
    sched.stop()


def job(session: str, max_tokens: int, prompt=PROMPT) -> Job:
    return Job(session, 1, GenerationRequest(prompt, max_tokens, mode="ar"), log_len=len(prompt))


def wait_job(j: Job, timeout: float = 60) -> Job:
    wait_for(lambda: j.finished, timeout, f"job {j.session}")
    return j


def test_scheduler_refuses_a_second_turn_and_survives_more_sessions_than_rows(scheduler, ar):
    sched, _ = scheduler
    a = sched.submit(job("a", 200))
    with pytest.raises(SessionBusy):
        sched.submit(job("a", 5))
    jobs = [a] + [sched.submit(job(f"s{i}", 20, PROMPT[i:])) for i in range(6)]   # 7 sessions, 2 rows
    for j in jobs:
        assert wait_job(j).error is None, j.error
        ar(list(j.req.prompt_ids), j.generated, j.session)
    assert sched.rows() == {"active": 0, "parked": 2, "free": 0} and sched.idle()


def test_scheduler_cancel_ends_a_turn_at_the_next_round(scheduler):
    sched, log = scheduler
    j = sched.submit(job("c", 1500))
    wait_for(lambda: len(j.generated) > 0, 30, "first tokens")
    assert sched.cancel(j)
    wait_job(j, 10)
    assert j.result.metrics.stop_reason == "aborted" and len(j.generated) < 1500
    assert log.appends["c"] == j.generated and sched.idle()


def test_scheduler_waits_out_a_redis_outage_without_losing_a_token(scheduler, ar):
    sched, log = scheduler
    j = sched.submit(job("o", 300))
    wait_for(lambda: len(j.generated) >= 20, 30, "tokens before the outage")
    log.down = True
    time.sleep(0.3)
    durable = len(j.generated)
    time.sleep(0.3)
    assert len(j.generated) == durable and not j.finished      # nothing streams ahead of the log
    log.down = False
    assert wait_job(j).error is None, j.error
    assert log.appends["o"] == j.generated and len(j.generated) == 300
    ar(PROMPT, j.generated, "through the outage")
