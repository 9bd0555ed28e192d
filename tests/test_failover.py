"""Failures cost speed, never tokens: kill -9 a drafter or a verifier mid-generation, take a lease
away, stop Redis. Real processes, real redis-server, real gRPC on 127.0.0.1.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from equality import assert_greedy_equal
from kvstore.coord.sessions import SessionStore, StaleEpoch
from sparsespec.client import GenerationError, SparseSpecClient
from sparsespec.cluster import ClusterConfig, LocalCluster
from sparsespec.models import load_model, load_tokenizer
from sparsespec.models.testing import save_random_model, tiny_config
from sparsespec.spec.loop import GenerationRequest, SpecEngine
from verifier_service.durable import DurableSessions, TurnSpec

PROMPT = "And the LORD spake unto Moses, saying, Speak unto the children of Israel. "
LONG = 600


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = tiny_config(max_position_embeddings=2048, eos_token_ids=(), num_layers=4)
    return save_random_model(tmp_path_factory.mktemp("failover") / "model", cfg, seed=9)


@pytest.fixture(scope="module")
def truth(model_dir):
    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    engine = SpecEngine(model, None, eos_ids=[tokenizer.eos_token_id])     # stops where the service does
    tokens = engine.generate(GenerationRequest(ids, LONG, mode="ar")).token_ids
    assert len(tokens) >= 200, "the test model must generate long enough to be killed mid-way"

    def check(out: list[int], label: str) -> None:
        assert_greedy_equal(model, ids, tokens, out, label)   # same tokens, same length: none lost or repeated
    return check


def new_cluster(model_dir, redis_srv, policy: str | None = "streaming") -> LocalCluster:
    """policy None: the default, a fed drafter."""
    redis_srv.start()
    return LocalCluster(ClusterConfig(model=str(model_dir), policy=policy, budget="32", k=4, lease_ms=1500),
                        redis_url=redis_srv.url).start()


def stream_in_background(client: SparseSpecClient, **kwargs):
    """Start a streaming generation in a thread; returns (received chunks, started event, thread)."""
    chunks, started, result = [], threading.Event(), {}

    def run():
        try:
            for chunk in client.stream(PROMPT, max_tokens=LONG, **kwargs):
                chunks.append(chunk)
                started.set()
        except Exception as e:  # noqa: BLE001 - the test reads it
            result["error"] = e
        started.set()

    t = threading.Thread(target=run)
    t.start()
    return chunks, started, t, result


@pytest.mark.parametrize("policy", ["streaming", None], ids=["own-kv", "fed"])
def test_drafter_killed_mid_generation_then_replaced(model_dir, redis_srv, truth, policy):
    cluster = new_cluster(model_dir, redis_srv, policy)
    try:
        with SparseSpecClient(cluster.address) as client:
            chunks, started, t, result = stream_in_background(client)
            assert started.wait(120)
            cluster.drafters[0].kill()                       # SIGKILL, mid-generation
            t.join(300)
            assert "error" not in result, result
            tokens = [x for c in chunks for x in c.token_ids]
            truth(tokens, "drafter killed")
            metrics = chunks[-1].metrics
            assert metrics["drafter_failures"] >= 1 and metrics["ar_steps"] > 0

            cluster.add_drafter()                            # a replacement registers in Redis
            deadline = time.monotonic() + 60
            while True:
                done = client.generate(PROMPT, max_tokens=LONG)
                truth(done.token_ids, "after replacement")
                if done.metrics["rounds"] > 0 or time.monotonic() > deadline:
                    break
            assert done.metrics["rounds"] > 0, "the replacement drafter was never used"
            if policy is None:                               # the replacement is fed too
                assert done.metrics["feeds_sent"] > 0 and done.metrics["drafter_kv_host_bytes"] == 0
    finally:
        cluster.stop()


@pytest.mark.parametrize("policy", ["streaming", None], ids=["own-kv", "fed"])
def test_verifier_killed_mid_generation_sdk_resumes_on_another(model_dir, redis_srv, truth, policy):
    cluster = new_cluster(model_dir, redis_srv, policy)
    try:
        cluster.add_verifier()
        with SparseSpecClient([v.address for v in cluster.verifiers], reconnect_timeout_s=60) as client:
            chunks, started, t, result = stream_in_background(client)
            assert started.wait(120)
            cluster.verifiers[0].kill()
            t.join(300)
            assert "error" not in result, result
            tokens = [x for c in chunks for x in c.token_ids]
            offsets = [c.offset for c in chunks]
            assert offsets == sorted(offsets)
            truth(tokens, "verifier killed")                 # none lost, none repeated
            assert client.reconnects >= 1
            if policy is None:                               # the taking-over verifier feeds the drafter
                assert chunks[-1].metrics["feeds_sent"] > 0 and chunks[-1].metrics["rounds"] > 0
    finally:
        cluster.stop()


def test_a_verifier_whose_lease_was_taken_cannot_append(redis_url):
    store = SessionStore(redis_url)
    spec = TurnSpec(max_tokens=8, k=2, mode="spec", adaptive=False)
    a = DurableSessions(store, "verifier-a", lease_ms=200)
    b = DurableSessions(store, "verifier-b", lease_ms=200)
    session, context, epoch_a = a.new_session([1, 2, 3], spec)
    a.append(session, epoch_a, len(context), [4])
    time.sleep(0.3)                                          # a stalls past its lease
    takeover = b.take_over(session)
    assert takeover.epoch == epoch_a + 1 and takeover.generated == [4]
    with pytest.raises(StaleEpoch):
        a.append(session, epoch_a, len(context) + 1, [5])
    with pytest.raises(StaleEpoch):
        a.renew(session, epoch_a)
    b.append(session, takeover.epoch, len(context) + 1, [5])
    assert store.context(session) == [1, 2, 3, 4, 5]


def test_redis_down_refuses_with_unavailable_then_recovers(model_dir, redis_srv, truth):
    cluster = new_cluster(model_dir, redis_srv)
    try:
        with SparseSpecClient(cluster.address, reconnect_timeout_s=1) as client:
            truth(client.generate(PROMPT, max_tokens=LONG).token_ids, "before")
            redis_srv.stop()
            with pytest.raises(GenerationError) as err:
                client.generate(PROMPT, max_tokens=8)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and "redis" in err.value.message
            redis_srv.start()
            deadline = time.monotonic() + 30
            while True:
                try:
                    done = client.generate(PROMPT, max_tokens=LONG)
                    break
                except GenerationError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            truth(done.token_ids, "after Redis came back")
            assert all(p.alive() for p in cluster.verifiers + cluster.drafters)
    finally:
        cluster.stop()


def test_sigterm_drains_running_turns(model_dir, redis_srv, truth):
    cluster = new_cluster(model_dir, redis_srv)
    try:
        verifier = cluster.verifiers[0]
        with SparseSpecClient(cluster.address, reconnect_timeout_s=5) as client:
            chunks, started, t, result = stream_in_background(client)
            assert started.wait(120)
            code = verifier.stop(timeout=90)                    # SIGTERM: drain, then exit 0
            assert code == 0, (code, verifier.output[-20:])
            t.join(120)
            assert "error" not in result, result
            truth([x for c in chunks for x in c.token_ids], "drained")
            assert client.reconnects == 0                       # finished by the draining verifier
    finally:
        cluster.stop()
