"""Committed means durable across a Redis restart: the Redis that `sparsespec up` runs
(sparsespec.redis_server.RedisServer, append-only file, fsync every second) keeps every session's
committed log, its epoch and its lease through a SIGTERM and through a kill -9."""

from __future__ import annotations

import os
import signal
import time

import pytest

from kvstore.coord.sessions import LeaseHeld, SessionNotFound, SessionStore, StaleEpoch
from sparsespec.redis_server import RedisServer, find_redis_server

PROMPT = [5, 6, 7, 8]


@pytest.fixture
def exe():
    path = find_redis_server()
    if path is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return path


def kill9(srv: RedisServer) -> None:
    """A crash: no shutdown, no last fsync (the process dies; the machine does not)."""
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait()
    assert not srv.running


def commit(store: SessionStore, sid: str, epoch: int, rounds: int) -> list[int]:
    n = len(store.context(sid))
    for i in range(rounds):
        n = store.append(sid, epoch, n, [100 + i, 200 + i])
    return store.context(sid)


def test_committed_log_and_fencing_survive_sigterm_and_kill9(exe):
    srv = RedisServer(exe)                          # the defaults `sparsespec up` uses
    try:
        srv.start()
        port, store = srv.port, SessionStore(srv.url)
        store.create("s1", PROMPT, owner="v1", lease_ttl_ms=60_000)
        context = commit(store, "s1", 1, 20)
        assert len(context) == len(PROMPT) + 40

        srv.stop()                                  # SIGTERM: a clean restart loses nothing
        srv.start()
        assert srv.port == port
        assert store.context("s1") == context
        context = commit(store, "s1", 1, 20)

        time.sleep(1.5)                             # > 1 s: everysec has fsynced what was written
        kill9(srv)
        srv.start()
        assert store.context("s1") == context
        rec = store.get("s1")
        assert (rec.epoch, rec.owner, rec.state) == (1, "v1", "active") and rec.lease_ms_left > 50_000

        # Fencing still works on the restored data: v1's lease is live, a take-over bumps the
        # epoch, and the old owner's appends are refused.
        with pytest.raises(LeaseHeld):
            store.acquire_lease("s1", "v2", 5_000)
        epoch = store.acquire_lease("s1", "v2", 5_000, steal_expired_only=False)
        assert epoch == 2
        with pytest.raises(StaleEpoch):
            store.append("s1", 1, len(context), [9])
        context = commit(store, "s1", epoch, 3)

        kill9(srv)                                  # at once: written before the reply, so kept too
        srv.start()
        assert store.context("s1") == context
        assert store.get("s1").epoch == 2
        with pytest.raises(StaleEpoch):
            store.append("s1", 1, len(context), [9])
        with pytest.raises(StaleEpoch):
            store.renew_lease("s1", "v1", 1, 1_000)
        assert store.append("s1", 2, len(context), [9]) == len(context) + 1
    finally:
        srv.close()
    assert not os.path.exists(srv.dir)              # its own temp dir goes with close()


def test_a_given_data_dir_outlives_the_server(exe, tmp_path):
    """`sparsespec up --redis-dir DIR`: a new server (another port) on the same dir has the data."""
    first = RedisServer(exe, dir=str(tmp_path))
    try:
        first.start()
        store = SessionStore(first.url)
        store.create("s1", PROMPT, owner="v1", lease_ttl_ms=1_000)
        context = commit(store, "s1", 1, 5)
    finally:
        first.close()
    assert os.path.isdir(tmp_path / "appendonlydir")           # close() leaves a given dir alone
    second = RedisServer(exe, dir=str(tmp_path))
    try:
        second.start()
        assert SessionStore(second.url).context("s1") == context
    finally:
        second.close()


def test_no_persistence_is_an_explicit_choice_and_loses_everything(exe):
    srv = RedisServer(exe, persistence="none")
    try:
        srv.start()
        store = SessionStore(srv.url)
        store.create("s1", PROMPT)
        srv.stop()
        srv.start()
        with pytest.raises(SessionNotFound):
            store.get("s1")
        assert not os.path.exists(os.path.join(srv.dir, "appendonlydir"))
    finally:
        srv.close()


def test_unknown_persistence_is_refused(exe):
    with pytest.raises(ValueError, match="persistence: must be one of"):
        RedisServer(exe, persistence="sometimes")
