"""The drafter over real gRPC on 127.0.0.1: lossless, q exact, bad input as statuses, memory budget,
and the service as a real process.

Every speculative run asserts drafter_failures == 0: a drafter that failed silently would fall back
to decoding alone and pass any equality test for the wrong reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import random_model
from drafter_service.server import DrafterServer
from equality import assert_greedy_equal
from kvstore.cache.sparse import SparseConfig, SparseKVCache
from sparsespec.errors import ContextOverflow, InvalidArgument
from sparsespec.rpc import convert
from sparsespec.rpc.drafter_client import GrpcDrafterClient
from sparsespec.rpc.errors import DrafterFull, DrafterRejected, DrafterUnavailable, SessionUnknown
from sparsespec.rpc.sparsespec.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc
from sparsespec.spec.adaptive import MAX_K
from sparsespec.spec.drafter import StateMismatch
from sparsespec.spec.drafter_host import DrafterHost, DrafterHostConfig, LocalDrafterClient
from sparsespec.spec.drafter_memory import session_cost
from sparsespec.spec.loop import GenerationRequest, SpecEngine
from sparsespec.spec.sampling import SamplingParams, SparseDist
from sparsespec.spec.transport import DRAFTER_FAILURES

ROOT = Path(__file__).resolve().parents[1]
MAX_CONTEXT, PROMPT_LEN, MAX_TOKENS, VOCAB = 512, 120, 24, 128
SMALL_MESSAGES = 4 << 20
CONFIGS = [("streaming", 16), ("chunk_topk", 16), ("snapkv", 16), ("full", None)]
SAMPLING = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=1234, q_support=8)


def sparse(policy, budget) -> SparseConfig:
    return SparseConfig(policy=policy, budget=budget)


@pytest.fixture(scope="module")
def model():
    return random_model(seed=0, max_context=MAX_CONTEXT)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, VOCAB, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.fixture(scope="module")
def ar_tokens(model, prompt):
    return SpecEngine(model, None).generate(GenerationRequest(prompt, MAX_TOKENS, mode="ar")).token_ids


@pytest.fixture(scope="module")
def servers(model):
    """(policy, budget, **engine/server options) -> a started DrafterServer, one per key."""
    started: dict = {}

    def get(policy, budget, memory_budget_bytes=None, max_message_bytes=16 << 20, clock=time.monotonic):
        key = (policy, budget, memory_budget_bytes, max_message_bytes, clock)
        if key not in started:
            host = DrafterHost(model, DrafterHostConfig(sparse(policy, budget), MAX_CONTEXT,
                                                        memory_budget_bytes), clock=clock)
            started[key] = DrafterServer(host, max_message_bytes=max_message_bytes, workers=4).start()
        return started[key]

    yield get
    for server in started.values():
        server.stop(grace=0)


@pytest.fixture
def stub(servers):
    channels = []

    def make(server):
        channels.append(grpc.insecure_channel(server.address))
        return drafter_pb2_grpc.DrafterStub(channels[-1])

    yield make
    for c in channels:
        c.close()


# --- (a) greedy over the wire equals the verifier alone ---------------------------------------

@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("policy,budget", CONFIGS)
def test_greedy_over_grpc_equals_ar(model, prompt, ar_tokens, servers, policy, budget, k):
    server = servers(policy, budget)
    with GrpcDrafterClient(server.address, timeout_s=30) as client:
        out = SpecEngine(model, client).generate(GenerationRequest(prompt, MAX_TOKENS, k=k))
    assert_greedy_equal(model, prompt, ar_tokens, out.token_ids, f"grpc {policy}/{budget}/k={k}")
    m = out.metrics
    assert m.drafter_failures == 0 and m.rounds > 0 and m.drafted == m.k_sum
    assert m.drafter_kv_device_bytes == server.drafter_host.cost.device_bytes - _obs_bytes(model, policy, budget)
    if budget is None:  # the drafter IS the verifier with the same cache: every draft is accepted
        assert m.alpha == 1.0
    assert server.drafter_host.load() == 0  # the run's release closed the session


def _obs_bytes(model, policy, budget) -> int:
    """The query rings are device memory the budget counts but DraftReply.device_bytes (KV) does not."""
    cache = SparseKVCache.for_model(model, 8, sparse(policy, budget))
    return cache.obs_bytes()


def test_concurrent_sessions_draft_as_alone(model, prompt, servers):
    """Four threads, four sessions, one server: each session drafts what it drafts in process."""
    server = servers("chunk_topk", 16)
    prompts = [prompt[i * 7:] for i in range(4)]

    def rounds(client, session, p):
        out, base, append = [], 0, list(p)
        for _ in range(5):
            reply = client.draft(session, base, append, 4, SamplingParams())
            out.append(reply.tokens)
            base, append = base + len(append), reply.tokens[:2] + [(reply.tokens[2] + 1) % VOCAB]
        client.close(session)
        return out

    local = LocalDrafterClient(DrafterHost(model, DrafterHostConfig(sparse("chunk_topk", 16), MAX_CONTEXT)))
    expected = [rounds(local, f"s{i}", p) for i, p in enumerate(prompts)]
    got = [None] * 4
    with GrpcDrafterClient(server.address, timeout_s=30) as client:
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, rounds(client, f"t{i}", prompts[i])))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert got == expected
    assert server.drafter_host.load() == 0


# --- (b) sampling: q travels exactly ----------------------------------------------------------

def test_sampling_params_round_trip():
    for p in (SAMPLING, SamplingParams(), SamplingParams(temperature=1.3, top_p=0.123456, seed=(1 << 63) - 1),
              SamplingParams(temperature=0.1, top_k=3, seed=-5, q_support=1)):
        assert convert.sampling_from_proto(convert.sampling_to_proto(p)) == p
    unset = convert.sampling_from_proto(common_pb2.SamplingParams(temperature=0.5))
    assert unset.top_p == 1.0 and unset.q_support == SamplingParams().q_support and unset.seed is None
    with pytest.raises(InvalidArgument, match=r"^sampling\.top_p: "):
        convert.sampling_from_proto(common_pb2.SamplingParams(top_p=1.5))
    with pytest.raises(InvalidArgument, match=r"^sampling\.seed: "):
        convert.sampling_to_proto(SamplingParams(seed=1 << 64))
    q = SparseDist(ids=torch.tensor([5, 3, 9]), probs=torch.tensor([0.5, 0.3, 0.2]))
    back = convert.dist_from_proto(convert.dist_to_proto(q))
    assert torch.equal(back.ids, q.ids) and torch.equal(back.probs, q.probs)


def test_sampling_drafts_and_q_equal_in_process(model, prompt, servers):
    server = servers("snapkv", 16)
    local = LocalDrafterClient(DrafterHost(model, DrafterHostConfig(sparse("snapkv", 16), MAX_CONTEXT)))
    with GrpcDrafterClient(server.address, timeout_s=30) as remote:
        for client in (local, remote):
            client.open("q", prompt, SAMPLING)
        base, append = len(prompt), []
        for _ in range(4):
            a = local.draft("q", base, append, 4, SAMPLING)
            b = remote.draft("q", base, append, 4, SAMPLING)
            assert a.tokens == b.tokens and len(b.qs) == 4
            for qa, qb in zip(a.qs, b.qs):
                assert torch.equal(qa.ids, qb.ids) and torch.equal(qa.probs, qb.probs)
                assert qb.probs.dtype == torch.float32
            base, append = base + len(append), a.tokens[:1] + [(a.tokens[1] + 1) % VOCAB]
        remote.close("q")


def test_sampling_generation_equals_in_process(model, prompt, servers):
    server = servers("chunk_topk", 16)
    req = GenerationRequest(prompt, MAX_TOKENS, sampling=SAMPLING, k=4)
    local = LocalDrafterClient(DrafterHost(model, DrafterHostConfig(sparse("chunk_topk", 16), MAX_CONTEXT)))
    expected = SpecEngine(model, local).generate(req)
    with GrpcDrafterClient(server.address, timeout_s=30) as client:
        got = SpecEngine(model, client).generate(req)
    assert got.token_ids == expected.token_ids
    assert got.metrics.drafter_failures == 0 and got.metrics.rounds == expected.metrics.rounds
    assert got.metrics.accepted == expected.metrics.accepted


# --- (c) bad input: a status naming the field, and the server keeps serving -------------------

def test_statuses():
    codes = grpc.StatusCode
    assert convert.status_for(InvalidArgument("k", "bad")) == codes.INVALID_ARGUMENT
    assert convert.status_for(ContextOverflow("tokens", "long")) == codes.OUT_OF_RANGE
    assert convert.status_for(StateMismatch("base_len")) == codes.FAILED_PRECONDITION
    assert convert.status_for(SessionUnknown("session_id")) == codes.NOT_FOUND
    assert convert.status_for(DrafterFull("full")) == codes.RESOURCE_EXHAUSTED
    assert convert.status_for(DrafterUnavailable("down")) == codes.UNAVAILABLE
    assert convert.status_for(RuntimeError("bug")) == codes.INTERNAL
    assert isinstance(convert.drafter_error(codes.FAILED_PRECONDITION, "x"), StateMismatch)
    assert isinstance(convert.drafter_error(codes.NOT_FOUND, "x"), SessionUnknown)
    assert isinstance(convert.drafter_error(codes.RESOURCE_EXHAUSTED, "x"), DrafterFull)
    assert isinstance(convert.drafter_error(codes.INVALID_ARGUMENT, "x"), DrafterRejected)
    for code in (codes.UNAVAILABLE, codes.DEADLINE_EXCEEDED, codes.INTERNAL, codes.UNKNOWN):
        assert type(convert.drafter_error(code, "x")) is DrafterUnavailable
    for code in codes:  # whatever a drafter answers, the round loop survives it
        if code != codes.OK:
            assert isinstance(convert.drafter_error(code, "x"), DRAFTER_FAILURES)


def _bad_requests(prompt):
    n = len(prompt)
    Open, Draft = drafter_pb2.OpenSessionRequest, drafter_pb2.DraftRequest
    ok = dict(session_id="ok", base_len=n, k=2)
    return [  # (rpc, request, status, what the message starts with / contains)
        ("OpenSession", Open(session_id="", tokens=prompt), "INVALID_ARGUMENT", "session_id: is empty"),
        ("Draft", Draft(session_id="", base_len=0, append=prompt, k=2), "INVALID_ARGUMENT",
         "session_id: is empty"),
        ("OpenSession", Open(session_id="x", tokens=[]), "INVALID_ARGUMENT", "tokens: is empty"),
        ("OpenSession", Open(session_id="x", tokens=[1, VOCAB]), "INVALID_ARGUMENT", "tokens: token id 128"),
        ("OpenSession", Open(session_id="x", tokens=[-1]), "INVALID_ARGUMENT", "tokens: token id -1"),
        ("OpenSession", Open(session_id="x", tokens=[1] * (MAX_CONTEXT + 1)), "OUT_OF_RANGE", "tokens: "),
        ("Draft", Draft(**{**ok, "k": 0}), "INVALID_ARGUMENT", "k: must be in [1, 64], got 0"),
        ("Draft", Draft(**{**ok, "k": MAX_K + 1}), "INVALID_ARGUMENT", "k: must be in [1, 64], got 65"),
        ("Draft", Draft(**ok, append=[3, VOCAB + 5]), "INVALID_ARGUMENT", "append: token id 133"),
        ("Draft", Draft(**{**ok, "base_len": -1}), "INVALID_ARGUMENT", "base_len: must be >= 0"),
        ("Draft", Draft(session_id="x", base_len=0, append=[], k=2), "INVALID_ARGUMENT", "append: is empty"),
        ("Draft", Draft(**ok, sampling=common_pb2.SamplingParams(top_p=1.5)), "INVALID_ARGUMENT",
         "sampling.top_p: "),
        ("Draft", Draft(**ok, sampling=common_pb2.SamplingParams(temperature=-1)), "INVALID_ARGUMENT",
         "sampling.temperature: "),
        ("Draft", Draft(**{**ok, "session_id": "never-opened"}), "NOT_FOUND", "session_id: 'never-opened'"),
        ("Draft", Draft(**{**ok, "base_len": n + 3}), "FAILED_PRECONDITION", f"base_len {n + 3} does not match"),
        ("Draft", Draft(**ok, summary=b"x" * 10_000_000), "RESOURCE_EXHAUSTED", "larger than max"),
        ("Draft", Draft(**ok, summary=b"\x02\x10"), "INVALID_ARGUMENT", "summary: truncated"),
        ("Draft", Draft(**ok, summary=b"\x09"), "INVALID_ARGUMENT", "summary.version: unknown format version 9"),
        ("Draft", Draft(**ok, summary=b"\x02\x20\x08\x02\x01\x01\x01\x02\x00\x01\x00\x3a\x00\x3a"),
         "INVALID_ARGUMENT", "summary.shares: a list sums to 1.5"),              # two shares of 0.75
        ("OpenSession", Open(session_id="x", tokens=prompt, epoch=-1), "INVALID_ARGUMENT", "epoch: "),
    ]


def test_bad_input_statuses_name_the_field(prompt, servers, stub):
    server = servers("streaming", 16, max_message_bytes=SMALL_MESSAGES)
    s = stub(server)
    valid = drafter_pb2.DraftRequest(session_id="ok", base_len=0, append=prompt, k=2)
    assert len(s.Draft(valid, timeout=30).tokens) == 2
    for rpc_name, request, code, message in _bad_requests(prompt):
        with pytest.raises(grpc.RpcError) as err:
            getattr(s, rpc_name)(request, timeout=30)
        e = err.value
        label = f"{rpc_name} expecting {code} {message!r}"
        assert e.code() == getattr(grpc.StatusCode, code), f"{label}: got {e.code()} {e.details()!r}"
        assert message in e.details(), f"{label}: got {e.details()!r}"
        assert "Traceback" not in e.details()
        if code != "RESOURCE_EXHAUSTED":  # our own messages start with the field they concern
            assert e.details().startswith(message.split(":")[0].split(" ")[0]), label
        reply = s.Draft(valid, timeout=30)  # ... and the server still serves
        assert len(reply.tokens) == 2 and not reply.q
    assert s.CloseSession(drafter_pb2.CloseSessionRequest(session_id="never-opened"), timeout=30) is not None
    assert server.drafter_host.load() == 1
    s.CloseSession(drafter_pb2.CloseSessionRequest(session_id="ok"), timeout=30)
    assert server.drafter_host.load() == 0


def test_unexpected_error_is_internal_without_traceback(prompt, servers, stub, monkeypatch):
    server = servers("streaming", 16)

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(server.drafter_host, "draft", boom)
    with pytest.raises(grpc.RpcError) as err:
        stub(server).Draft(drafter_pb2.DraftRequest(session_id="i", base_len=0, append=prompt, k=2), timeout=30)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "internal error: RuntimeError: boom second line"


def test_client_maps_statuses_to_drafter_failures(model, prompt, ar_tokens, servers):
    server = servers("streaming", 16)
    greedy = SamplingParams()
    with GrpcDrafterClient(server.address, timeout_s=30) as client:
        with pytest.raises(SessionUnknown, match="never-opened"):
            client.draft("never-opened", 5, [], 2, greedy)
        client.open("m", prompt, greedy)
        with pytest.raises(StateMismatch, match="base_len"):
            client.draft("m", len(prompt) + 1, [], 2, greedy)
        with pytest.raises(DrafterRejected, match="append: token id"):
            client.draft("m", len(prompt), [VOCAB], 2, greedy)
        client.close("m")
    with GrpcDrafterClient(server.address, timeout_s=1e-4) as client:  # a deadline nobody meets
        with pytest.raises(DrafterUnavailable, match="DEADLINE_EXCEEDED"):
            client.draft("d", 0, prompt, 2, greedy)
    server.drafter_host.close("d")  # in case the call reached the server after all
    dead = _dead_address()
    with GrpcDrafterClient(dead, timeout_s=5) as client:
        with pytest.raises(DrafterUnavailable, match="UNAVAILABLE"):
            client.open("x", prompt, greedy)
        # the round loop decodes alone through a dead drafter: same tokens, every round a plain step
        out = SpecEngine(model, client).generate(GenerationRequest(prompt, MAX_TOKENS, k=4))
    assert_greedy_equal(model, prompt, ar_tokens, out.token_ids, "dead drafter")
    assert out.metrics.rounds == 0 and out.metrics.drafter_failures > 0
    closed = GrpcDrafterClient(server.address)
    closed.shutdown()
    with pytest.raises(DrafterUnavailable):
        closed.draft("x", 0, prompt, 2, greedy)


def _dead_address() -> str:
    """An address nobody listens on: a port the OS gave us and we closed again."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


# --- (d) one device-memory budget --------------------------------------------------------------

@pytest.mark.parametrize("policy,budget", CONFIGS)
def test_session_cost_is_what_the_cache_allocates(model, policy, budget):
    cfg = sparse(policy, budget)
    cache = SparseKVCache.for_model(model, 700, cfg)
    cost = session_cost(model.cfg, model.dtype, 700, cfg)
    assert cost.device_bytes == cache.device_bytes() + cache.obs_bytes()
    assert cost.host_bytes == cache.host_bytes()
    half = session_cost(model.cfg, torch.float16, 700, cfg)
    assert half.device_bytes < cost.device_bytes


def test_memory_budget_refuses_then_accepts_after_close(model, prompt, servers, stub):
    cost = DrafterHost(model, DrafterHostConfig(sparse("chunk_topk", 16), MAX_CONTEXT)).cost.device_bytes
    server = servers("chunk_topk", 16, memory_budget_bytes=2 * cost + cost // 2)
    assert server.drafter_host.session_capacity == 2
    s = stub(server)
    for sid in ("a", "b"):
        reply = s.OpenSession(drafter_pb2.OpenSessionRequest(session_id=sid, tokens=prompt), timeout=30)
        assert reply.device_bytes > 0 and reply.host_bytes > 0
    with pytest.raises(grpc.RpcError) as err:
        s.OpenSession(drafter_pb2.OpenSessionRequest(session_id="c", tokens=prompt), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "memory budget" in err.value.details() and str(cost) in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # a Draft that would open a third is refused the same way
        s.Draft(drafter_pb2.DraftRequest(session_id="c", base_len=0, append=prompt, k=2), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with GrpcDrafterClient(server.address, timeout_s=30) as client, pytest.raises(DrafterFull):
        client.open("c", prompt, SamplingParams())
    s.OpenSession(drafter_pb2.OpenSessionRequest(session_id="a", tokens=prompt[:50]), timeout=30)  # re-open fits
    s.CloseSession(drafter_pb2.CloseSessionRequest(session_id="a"), timeout=30)
    s.OpenSession(drafter_pb2.OpenSessionRequest(session_id="c", tokens=prompt), timeout=30)
    reply = s.Draft(drafter_pb2.DraftRequest(session_id="c", base_len=len(prompt), k=3), timeout=30)
    assert len(reply.tokens) == 3
    assert server.drafter_host.load() == 2 and server.drafter_host.used_bytes() == 2 * cost
    for sid in ("b", "c"):
        s.CloseSession(drafter_pb2.CloseSessionRequest(session_id=sid), timeout=30)
    assert server.drafter_host.used_bytes() == 0


def test_full_drafter_costs_speed_not_tokens(model, prompt, servers):
    """One session fits; the second of a batch is refused and decodes alone, token-identical."""
    cost = DrafterHost(model, DrafterHostConfig(sparse("streaming", 16), MAX_CONTEXT)).cost.device_bytes
    server = servers("streaming", 16, memory_budget_bytes=cost)
    prompts = [prompt, prompt[30:]]
    alone = [SpecEngine(model, None).generate(GenerationRequest(p, MAX_TOKENS, mode="ar")).token_ids
             for p in prompts]
    with GrpcDrafterClient(server.address, timeout_s=30) as client:
        outs = SpecEngine(model, client).generate_many([GenerationRequest(p, MAX_TOKENS, k=4) for p in prompts])
    for p, a, o in zip(prompts, alone, outs):
        assert_greedy_equal(model, p, a, o.token_ids, "budget of one session")
    assert outs[0].metrics.drafter_failures == 0 and outs[0].metrics.rounds > 0
    assert outs[1].metrics.drafter_failures > 0
    assert server.drafter_host.load() == 0


def test_idle_sessions_are_evicted_after_the_ttl(model, prompt):
    now = [0.0]
    cfg = sparse("streaming", 16)
    cost = session_cost(model.cfg, model.dtype, MAX_CONTEXT + MAX_K + 1, cfg).device_bytes
    engine = DrafterHost(model, DrafterHostConfig(cfg, MAX_CONTEXT, memory_budget_bytes=cost,
                                                  session_ttl_s=10.0), clock=lambda: now[0])
    greedy = SamplingParams()
    engine.open("old", prompt, greedy)
    now[0] = 5.0
    with pytest.raises(DrafterFull):   # "old" is idle but within its TTL
        engine.open("new", prompt, greedy)
    engine.draft("old", len(prompt), [], 2, greedy)   # use refreshes it
    now[0] = 14.0
    assert engine.evict_idle() == []
    now[0] = 15.5
    engine.open("new", prompt, greedy)                 # admission evicts the idle one
    assert engine.load() == 1
    with pytest.raises(SessionUnknown, match="re-open it with base_len 0"):
        engine.draft("old", len(prompt), [], 2, greedy)
    now[0] = 30.0
    assert engine.evict_idle() == ["new"] and engine.used_bytes() == 0


def test_engine_config_is_validated(model):
    cfg = sparse("streaming", 16)
    with pytest.raises(InvalidArgument, match="^memory_budget_bytes: "):
        DrafterHost(model, DrafterHostConfig(cfg, MAX_CONTEXT, memory_budget_bytes=1000))
    with pytest.raises(InvalidArgument, match="^max_context: "):
        DrafterHost(model, DrafterHostConfig(cfg, MAX_CONTEXT * 2))
    with pytest.raises(InvalidArgument, match="^session_ttl_s: "):
        DrafterHostConfig(cfg, MAX_CONTEXT, session_ttl_s=0)


# --- (e) the service as a real process ---------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from sparsespec.models.testing import save_random_model, tiny_config
    return save_random_model(tmp_path_factory.mktemp("tiny") / "model",
                             tiny_config(max_position_embeddings=256, eos_token_ids=()), seed=3)


def _service(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "drafter_service", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0].strip() if box else ""


def test_service_process_serves_reports_health_and_stops_on_sigterm(model_dir):
    proc = _service("--model", model_dir, "--drafter", "layers:2", "--policy", "snapkv", "--budget", 16,
                    "--port", 0, "--host", "127.0.0.1", "--memory-budget-bytes", 50_000_000, "--threads", 1)
    try:
        line = _first_line(proc, 120)
        assert line.startswith("listening 127.0.0.1:"), (line, proc.poll() is not None and proc.stderr.read())
        address = line.split()[1]
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "sparsespec.v1.Drafter"):
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.SERVING
        with GrpcDrafterClient(address, timeout_s=30) as client:
            reply = client.draft("p", 0, [1] + [ord(c) for c in "In the beginning"], 4, SAMPLING)
            assert len(reply.tokens) == 4 and len(reply.qs) == 4 and reply.device_bytes > 0
            with pytest.raises(DrafterRejected, match="append: token id 300"):
                client.draft("p", 17, [300], 4, SAMPLING)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_service_bad_flag_is_one_line_exit_2(model_dir):
    proc = _service("--model", model_dir, "--policy", "nope", "--port", 0)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and out == ""
    assert err.strip().startswith("error: policy: ") and len(err.strip().splitlines()) == 1, err
