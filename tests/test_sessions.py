"""The Redis session store and worker registry, against a real redis-server (tests/redis_server.py)."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from kvstore.coord.registry import Heartbeat, WorkerInfo, WorkerRegistry
from kvstore.coord.sessions import (LeaseHeld, LogConflict, RedisUnavailable, SessionBusy, SessionClosed, SessionExists,
                              SessionNotFound, SessionStore, StaleEpoch, Turn)
from sparsespec.errors import InvalidArgument, SparseSpecError

PROMPT = [5, 6, 7, 8]


@pytest.fixture
def store(redis_url):
    return SessionStore(redis_url)


def wait_for(cond, timeout_s: float = 3.0, every_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while not (value := cond()):
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(every_s)
    return value


def session_keys(r: redis.Redis, sid: str) -> list[bytes]:
    return sorted(r.keys(f"sparsespec:session:{{{sid}}}:*"))


# --- records -------------------------------------------------------------------------------

def test_create_get_and_not_found(store):
    rec = store.create("s1", PROMPT, {"max_tokens": 8, "k": 4})
    assert (rec.session_id, rec.prompt_ids, rec.params) == ("s1", PROMPT, {"max_tokens": 8, "k": 4})
    assert (rec.epoch, rec.owner, rec.state, rec.lease_ms_left) == (0, "", "active", 0)
    assert rec.ctx_len == 4 and rec.turns == [Turn(0, 4)] and rec.generated_len == 0
    assert abs(rec.created_at - time.time()) < 60
    assert store.get("s1") == rec                      # what create returned is what Redis holds
    with pytest.raises(SessionExists, match="session_id: session 's1' already exists"):
        store.create("s1", [1])
    assert store.get("s1").prompt_ids == PROMPT       # the refused create changed nothing
    with pytest.raises(SessionNotFound, match="session_id: session 'nope' not found"):
        store.get("nope")
    for call in (lambda: store.read("nope"), lambda: store.context("nope"), lambda: store.get_summary("nope"),
                 lambda: store.append("nope", 1, 0, [1]), lambda: store.acquire_lease("nope", "v", 100)):
        with pytest.raises(SessionNotFound):
            call()


def test_a_retried_create_is_not_refused(store):
    """redis-py retries a command whose reply was lost; the create that landed must not then
    look like a clash with itself (the per-call nonce tells them apart)."""
    args = [b"", "{}", "1.0", "nonce-1", "v1", 1000]
    keys = store._keys("s1", "meta", "ctx", "turns", "summary", "lease")
    assert store._create(keys=keys, args=args) == [0, 1]
    assert store._create(keys=keys, args=args) == [0, 1]
    assert store._create(keys=keys, args=args[:3] + ["nonce-2"] + args[4:]) == [6]
    assert store.get("s1").epoch == 1


def test_create_leased_and_bad_input(store):
    rec = store.create("s1", PROMPT, owner="v1", lease_ttl_ms=5000)
    assert (rec.epoch, rec.owner) == (1, "v1")
    rec = store.get("s1")
    assert (rec.epoch, rec.owner) == (1, "v1") and 0 < rec.lease_ms_left <= 5000
    with pytest.raises(LeaseHeld):
        store.acquire_lease("s1", "v2", 200)
    for call, field in [(lambda: store.create("s2", [1, -1]), "prompt_ids"),
                        (lambda: store.create("s2", [1, 2**32]), "prompt_ids"),
                        (lambda: store.create("s2", [1.5]), "prompt_ids"),
                        (lambda: store.create("a{b}", [1]), "session_id"),
                        (lambda: store.create("", [1]), "session_id"),
                        (lambda: store.create("s2", [1], {"x": object()}), "params"),
                        (lambda: store.create("s2", [1], owner="v", lease_ttl_ms=0), "ttl_ms"),
                        (lambda: store.append("s1", 1, 4, [3, "x"]), "tokens"),
                        (lambda: store.append("s1", 1, None, [3]), "expected_len")]:
        with pytest.raises(InvalidArgument) as e:
            call()
        assert str(e.value).startswith(field + ":") and isinstance(e.value, SparseSpecError)
    with pytest.raises(SessionNotFound):
        store.get("s2")                                # nothing half-written by a refused create
    assert store.context("s1") == PROMPT


# --- the committed log ---------------------------------------------------------------------

def test_append_and_read(store):
    store.create("s1", PROMPT)
    epoch = store.acquire_lease("s1", "v1", 5000)
    assert epoch == 1
    assert store.append("s1", epoch, 4, [10, 11]) == 6
    assert store.append("s1", epoch, 6, [12]) == 7
    assert store.append("s1", epoch, 7, []) == 7
    assert store.append("s1", epoch, 6, [12]) == 7     # a retry of a landed append: no double write
    assert store.read("s1") == [10, 11, 12]
    assert store.read("s1", 1) == [11, 12] and store.read("s1", 1, 2) == [11] and store.read("s1", 5) == []
    assert store.context("s1") == PROMPT + [10, 11, 12]
    assert store.get("s1").generated_len == 3
    big = list(range(100_000, 150_000))                # long contexts: one packed APPEND, one GET
    assert store.append("s1", epoch, 7, big) == 50_007
    assert store.read("s1", 3) == big


def test_stale_epoch_refused_after_another_owner_acquires(store):
    store.create("s1", PROMPT)
    e1 = store.acquire_lease("s1", "v1", 200)
    assert store.append("s1", e1, 4, [1]) == 5
    time.sleep(0.25)                                   # v1's lease expires (v1 is stuck, say)
    e2 = store.acquire_lease("s1", "v2", 5000)
    assert e2 == e1 + 1
    with pytest.raises(StaleEpoch, match="epoch: session 's1' is now at epoch 2") as e:
        store.append("s1", e1, 5, [2])               # right length, stale owner: refused
    assert e.value.current == e2
    for call in (lambda: store.renew_lease("s1", "v1", e1, 200), lambda: store.finish("s1", e1),
                 lambda: store.begin_turn("s1", e1, 5, [3]), lambda: store.put_summary("s1", e1, b"x")):
        with pytest.raises(StaleEpoch):
            call()
    assert store.append("s1", e2, 5, [7]) == 6
    assert store.context("s1") == PROMPT + [1, 7]
    rec = store.get("s1")
    assert (rec.epoch, rec.owner, rec.state) == (2, "v2", "active")


def test_expected_len_conflict_refused(store):
    store.create("s1", PROMPT)
    epoch = store.acquire_lease("s1", "v1", 5000)
    store.append("s1", epoch, 4, [1, 2])
    for expected, tokens in [(4, [9]), (5, [9]), (7, [9]), (4, [1, 3])]:
        with pytest.raises(LogConflict, match="expected_len: session 's1' has 6 committed tokens") as e:
            store.append("s1", epoch, expected, tokens)
        assert e.value.actual_len == 6
    assert store.context("s1") == PROMPT + [1, 2]


def test_concurrent_appenders_only_the_lease_holder_lands(redis_url):
    """Four owners keep stealing the session from each other and appending; every append that
    succeeded is in the log at the place it claimed, in epoch order, and nothing else is."""
    SessionStore(redis_url).create("s1", PROMPT)
    landed: list[tuple[int, int, int]] = []            # (position, epoch, token)
    counts = {"stale": 0, "conflict": 0}
    lock = threading.Lock()

    def owner(tid: int):
        store = SessionStore(redis_url)
        seq = 0
        for _ in range(8):
            epoch = store.acquire_lease("s1", f"v{tid}", 5000, steal_expired_only=False)
            n = store.get("s1").ctx_len
            for _ in range(5):
                token = tid * 1000 + seq
                seq += 1
                try:
                    n = store.append("s1", epoch, n, [token])
                except StaleEpoch:
                    with lock:
                        counts["stale"] += 1
                    break
                except LogConflict:
                    with lock:
                        counts["conflict"] += 1
                    break
                with lock:
                    landed.append((n - 1, epoch, token))

    threads = [threading.Thread(target=owner, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    log = SessionStore(redis_url).context("s1")
    assert log[:4] == PROMPT
    landed.sort()
    assert [p for p, _, _ in landed] == list(range(4, len(log)))   # each position written once
    assert [tok for _, _, tok in landed] == log[4:]
    epochs = [e for _, e, _ in landed]
    assert epochs == sorted(epochs)                    # no stale owner wrote after a newer one
    assert counts["conflict"] == 0
    assert counts["stale"] > 0, "the owners never raced; the test proved nothing"


# --- leases --------------------------------------------------------------------------------

def test_lease_live_refuses_expired_lets_another_acquire(store):
    store.create("s1", PROMPT)
    e1 = store.acquire_lease("s1", "v1", 300)
    with pytest.raises(LeaseHeld, match="lease: session 's1' is leased by 'v1' for another") as e:
        store.acquire_lease("s1", "v2", 300)
    assert e.value.owner == "v1" and 0 < e.value.ms_left <= 300
    time.sleep(0.15)
    store.renew_lease("s1", "v1", e1, 300)             # renewed: 300 ms from now, not from the start
    assert store.get("s1").lease_ms_left > 150
    with pytest.raises(LeaseHeld):
        store.acquire_lease("s1", "v2", 300)
    time.sleep(0.32)
    assert store.get("s1").lease_ms_left == 0
    e2 = store.acquire_lease("s1", "v2", 200)
    assert e2 == e1 + 1
    store.release_lease("s1", "v2", e2)                # released: v3 may take it at once
    e3 = store.acquire_lease("s1", "v3", 5000)
    assert e3 == e2 + 1
    e4 = store.acquire_lease("s1", "v4", 5000, steal_expired_only=False)   # forced take-over
    assert e4 == e3 + 1 and store.get("s1").owner == "v4"
    assert store.acquire_lease("s1", "v4", 5000) == e4 + 1   # re-acquiring fences its own past too


# --- turns ---------------------------------------------------------------------------------

def test_multi_turn_context_reconstruction(store):
    store.create("s1", PROMPT, {"turn": 0}, owner="v1", lease_ttl_ms=5000)
    store.append("s1", 1, 4, [10, 11, 12])
    store.finish("s1", 1)
    start = store.begin_turn("s1", 1, 7, [20, 21], params={"turn": 1}, turn_id="t1")
    assert start == 9
    assert store.begin_turn("s1", 1, 7, [20, 21], turn_id="t1") == 9  # a retry: no second turn, no double tokens
    with pytest.raises(SessionBusy, match="session_id: session 's1' has a turn in progress"):
        store.begin_turn("s1", 1, 9, [22])              # another turn while this one runs
    store.append("s1", 1, 9, [30])
    store.finish("s1", 1)
    start = store.begin_turn("s1", 1, 10, [])          # a turn without user tokens
    assert start == 10
    store.append("s1", 1, 10, [40, 41])
    rec = store.get("s1")
    assert rec.turns == [Turn(0, 4), Turn(7, 9), Turn(10, 10)]
    assert (rec.params, rec.state, rec.generated_len) == ({"turn": 1}, "active", 2)
    # a replacement verifier rebuilds everything from Redis alone
    e2 = SessionStore(store.redis).acquire_lease("s1", "v2", 5000, steal_expired_only=False)
    ctx = store.context("s1")
    assert ctx == PROMPT + [10, 11, 12] + [20, 21] + [30] + [40, 41]
    assert [ctx[t.user_start:t.gen_start] for t in rec.turns] == [PROMPT, [20, 21], []]
    assert store.read("s1", turn=0) == [10, 11, 12] and store.read("s1", turn=1) == [30]
    assert store.read("s1") == store.read("s1", turn=2) == [40, 41] and store.read("s1", 1, turn=-3) == [11, 12]
    with pytest.raises(InvalidArgument, match="turn: session 's1' has 3 turns"):
        store.read("s1", turn=3)
    store.finish("s1", e2)
    with pytest.raises(LogConflict):
        store.begin_turn("s1", e2, 10, [50])           # not at the end of the context


# --- finishing -----------------------------------------------------------------------------

def test_finish_sets_ttl_on_every_key(store, redis_url):
    r = redis.Redis.from_url(redis_url)
    store.create("s1", PROMPT, owner="v1", lease_ttl_ms=5000)
    store.append("s1", 1, 4, [1])
    store.put_summary("s1", 1, b"sum")
    keys = session_keys(r, "s1")
    assert {k.rsplit(b":", 1)[1] for k in keys} == {b"meta", b"ctx", b"turns", b"summary", b"lease"}
    assert [r.ttl(k) for k in keys if not k.endswith(b":lease")] == [-1] * 4
    store.finish("s1", 1, "aborted")
    assert all(0 < r.ttl(k) <= 3600 for k in session_keys(r, "s1"))
    assert store.get("s1").state == "aborted"
    with pytest.raises(SessionClosed, match="session_id: session 's1' is aborted"):
        store.append("s1", 1, 5, [2])
    store.put_summary("s1", 1, b"later")               # a late summary expires with the session
    pipe = r.pipeline(transaction=True)
    meta_ms, summary_ms = pipe.pttl(store._key("s1", "meta")).pttl(store._key("s1", "summary")).execute()
    assert meta_ms > 0 and abs(summary_ms - meta_ms) <= 2
    store.begin_turn("s1", 1, 5, [3])                  # a new turn: kept again
    assert [r.ttl(k) for k in session_keys(r, "s1") if not k.endswith(b":lease")] == [-1] * 4
    with pytest.raises(InvalidArgument):
        store.finish("s1", 1, "active")


def test_finished_session_is_cleaned_up(redis_url):
    store = SessionStore(redis_url, finished_ttl_s=0.2)
    r = redis.Redis.from_url(redis_url)
    store.create("s1", PROMPT, owner="v1", lease_ttl_ms=100)
    store.put_summary("s1", 1, b"s")
    store.create("s2", PROMPT)
    store.finish("s1", 1)
    wait_for(lambda: not session_keys(r, "s1"), timeout_s=2)
    with pytest.raises(SessionNotFound):
        store.get("s1")
    assert store.get("s2").state == "active"          # unfinished sessions stay
    rec = store.create("s1", [9])                      # the id may be reused, from scratch
    assert (rec.prompt_ids, rec.epoch) == ([9], 0) and store.get_summary("s1") is None


# --- summary -------------------------------------------------------------------------------

def test_summary_slot_round_trip(store):
    store.create("s1", PROMPT)
    assert store.get_summary("s1") is None
    epoch = store.acquire_lease("s1", "v1", 5000)
    blob = bytes(range(256)) * 10
    store.put_summary("s1", epoch, blob)
    assert store.get_summary("s1") == blob
    store.put_summary("s1", epoch, b"newer")
    assert store.get_summary("s1") == b"newer"
    with pytest.raises(InvalidArgument, match="summary:"):
        store.put_summary("s1", epoch, "text")


# --- registry ------------------------------------------------------------------------------

def worker(wid: str, role: str = "drafter", load: int = 0, model: str = "smollm2-135m") -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role=role, address=f"10.0.0.1:{5000 + len(wid)}", model=model,
                      capacity=8, load=load)


def test_registry_live_sorted_by_load(redis_url):
    reg = WorkerRegistry(redis_url, heartbeat_ttl_s=5)
    v1 = worker("v1", role="verifier")
    for w in [worker("d1", load=3), worker("d2", load=1), worker("d3", load=2, model="llama"), v1]:
        reg.register(w)
    assert [w.worker_id for w in reg.live("drafter")] == ["d2", "d3", "d1"]
    assert [w.worker_id for w in reg.live("drafter", "smollm2-135m")] == ["d2", "d1"]
    assert reg.live("verifier") == [v1]                # every field round-trips
    assert reg.heartbeat("d1", load=0) is True
    assert [w.worker_id for w in reg.live("drafter")] == ["d1", "d2", "d3"]
    reg.deregister("d1")
    assert [w.worker_id for w in reg.live("drafter")] == ["d2", "d3"]
    with pytest.raises(InvalidArgument, match="role:"):
        reg.live("router")
    with pytest.raises(InvalidArgument, match="address:"):
        WorkerInfo(worker_id="x", role="drafter", address="nohost", model="m", capacity=1)


def test_heartbeat_expiry_drops_worker(redis_url):
    reg = WorkerRegistry(redis_url, heartbeat_ttl_s=0.2)
    reg.register(worker("d1", load=1))
    reg.register(worker("d2", load=2))
    t0 = time.monotonic()
    ids = ["d1", "d2"]
    while ids != ["d1"]:                               # d1 beats, d2 has gone quiet
        assert ids == ["d1", "d2"] and time.monotonic() - t0 < 3
        time.sleep(0.05)
        assert reg.heartbeat("d1") is True
        ids = [w.worker_id for w in reg.live("drafter")]
    assert time.monotonic() - t0 >= 0.2                # d2 lived out its TTL first
    assert reg.heartbeat("d2") is False                # it must register again
    assert reg.redis.smembers(reg._set) == {b"d1"}     # live() pruned the expired id


def test_heartbeat_thread_keeps_worker_live_and_survives_redis_restart(redis_srv, redis_url):
    reg = WorkerRegistry(redis_url, heartbeat_ttl_s=0.45)
    load = [3]
    hb = Heartbeat(reg, worker("d1"), load=lambda: load[0]).start()
    try:
        wait_for(lambda: reg.live("drafter"))
        time.sleep(1.0)                                # > 2 TTLs: only the heartbeats keep it
        assert [(w.worker_id, w.load) for w in reg.live("drafter")] == [("d1", 3)]
        redis_srv.stop()                               # Redis blinks and comes back empty
        wait_for(lambda: hb.failures >= 2)
        assert hb._thread.is_alive()
        redis_srv.start()
        load[0] = 5
        live = wait_for(lambda: reg.live("drafter"))   # re-registered by the thread
        assert [(w.worker_id, w.load) for w in live] == [("d1", 5)]
        wait_for(lambda: hb.failures == 0)
    finally:
        hb.stop()
    assert not hb._thread.is_alive()
    assert reg.live("drafter") == []                  # stop() deregistered it


# --- Redis unreachable ---------------------------------------------------------------------

def test_redis_down_is_unavailable_then_recovers(redis_srv, redis_url):
    store, reg = SessionStore(redis_url), WorkerRegistry(redis_url)
    store.create("s1", PROMPT)
    redis_srv.stop()
    t0 = time.monotonic()
    with pytest.raises(RedisUnavailable) as e:
        store.create("s2", PROMPT)
    assert time.monotonic() - t0 < 2.0                 # refused fast, not hung
    assert str(e.value).startswith(f"redis: {redis_srv.address} is unreachable")
    assert isinstance(e.value, SparseSpecError)
    for call in (store.ping, lambda: store.get("s1"), lambda: store.append("s1", 1, 4, [1]),
                 lambda: store.context("s1"), lambda: reg.live("drafter"), lambda: reg.register(worker("d1"))):
        with pytest.raises(RedisUnavailable, match=redis_srv.address):
            call()
    redis_srv.start()                                  # back, empty (--save ''): the same clients work
    store.ping()
    assert store.create("s2", PROMPT).prompt_ids == PROMPT
    assert store.acquire_lease("s2", "v1", 1000) == 1  # scripts are reloaded transparently
    with pytest.raises(SessionNotFound):
        store.get("s1")
    reg.register(worker("d1"))
    assert [w.worker_id for w in reg.live("drafter")] == ["d1"]


def test_full_redis_is_unavailable_and_nothing_half_written(store, redis_url):
    r = redis.Redis.from_url(redis_url)
    store.create("s1", PROMPT, owner="v1", lease_ttl_ms=5000)
    store.create("s3", PROMPT, owner="v1", lease_ttl_ms=5000)
    store.finish("s3", 1)
    r.config_set("maxmemory", 1)                       # full (noeviction): writes refused
    try:
        with pytest.raises(RedisUnavailable, match="cannot serve this now .*OutOfMemoryError"):
            store.create("s2", [1, 2, 3])
        with pytest.raises(RedisUnavailable):
            store.append("s1", 1, 4, [9])
        with pytest.raises(RedisUnavailable):
            store.begin_turn("s3", 1, 4, [9, 9])
    finally:
        r.config_set("maxmemory", 0)
    assert session_keys(r, "s2") == []
    for s in ("s1", "s3"):
        rec = store.get(s)
        assert (rec.ctx_len, rec.turns) == (4, [Turn(0, 4)]) and store.context(s) == PROMPT
