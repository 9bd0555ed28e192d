"""Drafter memory on the host (issue #11 item 6): a host budget beside the device one, counted
exactly; admission refuses what would not fit; the registry advertises what both budgets hold; and
closed or evicted sessions give their RAM back to the OS (the process's RSS falls with them).

(a) the engine in process, (b) `python -m drafter_service` as a real process with a tiny model
whose 64K-token context makes one session's host tier ~50 MB. Names that came with the host budget
are imported in the tests that use them, so (b) also runs against a drafter from before it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from conftest import random_model
from drafter_service import server as drafter_server
from drafter_service.registry import UNLIMITED
from drafter_service.server import ServerConfig
from kvstore.cache.sparse import SparseConfig, SparseKVCache
from sparsespec.errors import InvalidArgument
from sparsespec.rpc.drafter_client import GrpcDrafterClient
from sparsespec.rpc.errors import DrafterFull
from sparsespec.rpc.sparsespec.v1 import drafter_pb2, drafter_pb2_grpc
from sparsespec.spec.drafter_host import DrafterHost, DrafterHostConfig
from sparsespec.spec.drafter_memory import session_cost
from sparsespec.spec.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
MAX_CONTEXT = 512
GREEDY = SamplingParams()
CONFIGS = [("streaming", 16), ("chunk_topk", 16), ("snapkv", 16), ("fed", 16), ("full", None)]


@pytest.fixture(scope="module")
def model():
    return random_model(seed=0, max_context=MAX_CONTEXT)


def engine(model, policy="streaming", budget=16, **budgets) -> DrafterHost:
    return DrafterHost(model, DrafterHostConfig(SparseConfig(policy=policy, budget=budget), MAX_CONTEXT,
                                                **budgets))


# --- (a) the engine ---------------------------------------------------------------------------

@pytest.mark.parametrize("policy,budget", CONFIGS)
def test_host_cost_is_what_the_cache_allocates(model, policy, budget):
    """On CPU the device KV is host RAM too; on CUDA only the host tier is."""
    cfg = SparseConfig(policy=policy, budget=budget)
    cache = SparseKVCache.for_model(model, 700, cfg)
    cost = session_cost(model.cfg, model.dtype, 700, cfg)
    assert cost.host_memory_bytes("cpu") == cache.host_bytes() + cache.device_bytes() + cache.obs_bytes()
    assert cost.host_memory_bytes(torch.device("cuda")) == cache.host_bytes()
    if policy == "fed":
        assert cost.host_bytes == cache.host_bytes() == 0


def test_host_budget_refuses_then_fits_after_close_or_eviction(model):
    now = [0.0]
    cost = engine(model).cost.host_memory_bytes("cpu")
    limit = 2 * cost + cost // 2
    e = DrafterHost(model, DrafterHostConfig(SparseConfig(policy="streaming", budget=16), MAX_CONTEXT,
                                             session_ttl_s=10.0, host_memory_budget_bytes=limit),
                    clock=lambda: now[0])
    assert e.session_capacity == 2
    prompt = list(range(3, 40))
    for sid in ("a", "b"):
        e.open(sid, prompt, GREEDY)
    assert e.used_host_bytes() == 2 * cost
    with pytest.raises(DrafterFull) as err:
        e.open("c", prompt, GREEDY)
    msg = str(err.value)
    assert "host memory budget (host_memory_budget_bytes)" in msg, msg
    assert f"needs {cost} bytes of host tier + device KV" in msg and f"{2 * cost} of the {limit}-byte" in msg, msg
    assert e.close("a") and e.used_host_bytes() == cost
    e.open("c", prompt, GREEDY)                        # the closed session's bytes are free again
    e.draft("c", len(prompt), [], 2, GREEDY)
    now[0] = 11.0                                      # both idle past the TTL
    assert sorted(e.evict_idle()) == ["b", "c"] and e.used_host_bytes() == 0 and e.used_bytes() == 0


def test_capacity_is_the_min_of_both_budgets(model):
    cost = engine(model).cost
    host = cost.host_memory_bytes("cpu")
    assert engine(model).session_capacity is None
    assert engine(model, memory_budget_bytes=3 * cost.device_bytes, host_memory_budget_bytes=2 * host).session_capacity == 2
    device_bound = engine(model, memory_budget_bytes=cost.device_bytes, host_memory_budget_bytes=5 * host)
    assert device_bound.session_capacity == 1
    device_bound.open("a", [5, 6, 7], GREEDY)
    with pytest.raises(DrafterFull, match=r"device memory budget \(memory_budget_bytes\)"):
        device_bound.open("b", [5, 6, 7], GREEDY)


def test_config_is_validated_naming_the_field(model):
    cfg = SparseConfig(policy="streaming", budget=16)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(InvalidArgument, match="^host_memory_budget_bytes: "):
            DrafterHostConfig(cfg, MAX_CONTEXT, host_memory_budget_bytes=bad)
    host = engine(model).cost.host_memory_bytes("cpu")
    with pytest.raises(InvalidArgument, match=rf"^host_memory_budget_bytes: {host - 1} bytes cannot hold one "
                                              rf"session \({host} bytes of host tier"):
        engine(model, host_memory_budget_bytes=host - 1)
    for bad in (0, "lots", True):
        with pytest.raises(InvalidArgument, match="^host_memory_bytes: "):
            ServerConfig(model="m", host_memory_bytes=bad)


def test_default_host_budget_is_a_fraction_of_available_ram(monkeypatch):
    from drafter_service.server import AUTO_HOST_FRACTION, host_memory_budget
    monkeypatch.setattr(drafter_server, "available_host_bytes", lambda: 10_000_000_000)
    assert host_memory_budget(ServerConfig(model="m")) == int(10_000_000_000 * AUTO_HOST_FRACTION)
    assert host_memory_budget(ServerConfig(model="m", host_memory_bytes="unlimited")) is None
    assert host_memory_budget(ServerConfig(model="m", host_memory_bytes=12345)) == 12345
    monkeypatch.setattr(drafter_server, "available_host_bytes", lambda: None)
    with pytest.raises(InvalidArgument, match="^host_memory_bytes: 'auto' cannot read /proc/meminfo"):
        host_memory_budget(ServerConfig(model="m"))


def test_available_host_bytes_respects_the_cgroup_limit(tmp_path):
    from sparsespec.spec.drafter_memory import available_host_bytes
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 64000000 kB\nMemAvailable: 50000000 kB\n")
    assert available_host_bytes(tmp_path) == 50_000_000 * 1024          # no cgroup files: MemAvailable
    cg = tmp_path / "sys/fs/cgroup"
    cg.mkdir(parents=True)
    (cg / "memory.max").write_text("8000000000\n")
    (cg / "memory.current").write_text("3000000000\n")
    (cg / "memory.stat").write_text("anon 2000000000\ninactive_file 1000000000\n")
    assert available_host_bytes(tmp_path) == 8_000_000_000 - (3_000_000_000 - 1_000_000_000)
    (cg / "memory.max").write_text("max\n")
    assert available_host_bytes(tmp_path) == 50_000_000 * 1024
    assert available_host_bytes(tmp_path / "nowhere") is None


# --- (b) a real drafter process ------------------------------------------------------------------

SESSIONS = 6
PROMPT = [1] + [ord(c) for c in "In the beginning God created the heaven"]


@pytest.fixture(scope="module")
def big_model_dir(tmp_path_factory):
    from sparsespec.models.testing import save_random_model, tiny_config
    return save_random_model(tmp_path_factory.mktemp("mem") / "model",
                             tiny_config(max_position_embeddings=65536, eos_token_ids=()), seed=3)


@pytest.fixture(scope="module")
def big_session(big_model_dir):
    """What one session of the child's engine costs (chunk_topk, budget 16, the whole context)."""
    from sparsespec.models.loader import load_config
    cfg, sparse = load_config(big_model_dir), SparseConfig(budget=16)
    return session_cost(cfg, torch.float32, DrafterHostConfig(sparse, cfg.max_position_embeddings).capacity, sparse)


@pytest.fixture(scope="module")
def big_cost(big_session) -> int:
    """Host RAM per session of the child: on CPU the host tier and the device KV."""
    return big_session.host_bytes + big_session.device_bytes


class Child:
    """`python -m drafter_service` running this checkout's code (PYTHONPATH, cwd), registered in Redis."""

    def __init__(self, model_dir, redis_url: str, worker_id: str, *flags):
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "drafter_service", "--model", model_dir, "--budget", "16", "--threads", "1",
             "--policy", "chunk_topk",                       # a host tier to measure (a fed drafter has none)
             "--redis", redis_url, "--worker-id", worker_id, *map(str, flags)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(120)
        line = box[0].strip() if box else ""
        if not line.startswith("listening "):
            self.stop()
            raise AssertionError(f"drafter did not start: {line!r} {self.proc.stderr.read()}")
        self.address = line.split()[1]

    def rss(self) -> int:
        """VmRSS of the child, bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def auto_child(big_model_dir, redis_srv):
    """A drafter with every memory flag at its default."""
    redis_srv.start()
    child = Child(big_model_dir, redis_srv.url, "mem-auto")
    yield child
    child.stop()


def _registered(redis_url: str, worker_id: str, timeout_s: float = 30.0):
    """The worker's registry record (its heartbeat thread registers it just after `listening`)."""
    from kvstore.coord.registry import WorkerRegistry
    registry, deadline = WorkerRegistry(redis_url), time.monotonic() + timeout_s
    while True:
        found = [w for w in registry.live("drafter") if w.worker_id == worker_id]
        if found or time.monotonic() > deadline:
            assert found, f"{worker_id} is not in the worker registry"
            return found[0]
        time.sleep(0.1)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def test_default_budget_makes_the_registry_capacity_finite(auto_child, big_cost, redis_srv):
    capacity = _registered(redis_srv.url, "mem-auto").capacity
    assert capacity < UNLIMITED, f"a CPU drafter with default flags advertises capacity {capacity} (unlimited)"
    from sparsespec.spec.drafter_memory import available_host_bytes
    from drafter_service.server import AUTO_HOST_FRACTION
    available = available_host_bytes()   # the child measured it seconds ago; RAM in use moves a little
    expected = int(AUTO_HOST_FRACTION * available) // big_cost
    assert abs(capacity - expected) <= 0.1 * expected, (
        f"capacity {capacity}: expected {AUTO_HOST_FRACTION:.0%} of {_mb(available)} available / "
        f"{_mb(big_cost)} per session = {expected}")


def test_closed_sessions_return_their_memory_to_the_os(auto_child, big_cost):
    with GrpcDrafterClient(auto_child.address, timeout_s=60) as client:
        client.draft("warm", 0, PROMPT, 4, GREEDY)   # lazily built model state is not a session's
        client.close("warm")
        baseline = auto_child.rss()
        for round_ in range(2):
            for i in range(SESSIONS):
                client.draft(f"s{i}", 0, PROMPT, 4, GREEDY)
            held = auto_child.rss()
            for i in range(SESSIONS):
                client.close(f"s{i}")
            after = auto_child.rss()
            numbers = (f"round {round_}: baseline {_mb(baseline)}, {SESSIONS} sessions of {_mb(big_cost)} open "
                       f"{_mb(held)}, all closed {_mb(after)}")
            assert held - baseline > 0.8 * SESSIONS * big_cost, numbers   # the sessions really took RAM
            assert after - baseline < big_cost / 2, numbers


def test_host_budget_refuses_over_grpc_and_eviction_frees_it(big_model_dir, big_session, big_cost, redis_srv):
    """Room for 3 sessions by the host budget (the device one would hold 5): the 4th is refused
    with RESOURCE_EXHAUSTED naming the host budget; once the TTL evicts the 3, RSS is back and it fits."""
    redis_srv.start()
    limit = 3 * big_cost + big_cost // 2
    child = Child(big_model_dir, redis_srv.url, "mem-fixed", "--host-memory-bytes", limit,
                  "--memory-budget-bytes", 5 * big_session.device_bytes, "--session-ttl-s", 3)
    try:
        assert _registered(redis_srv.url, "mem-fixed").capacity == 3
        with grpc.insecure_channel(child.address) as channel, \
                GrpcDrafterClient(child.address, timeout_s=60) as client:
            stub = drafter_pb2_grpc.DrafterStub(channel)
            client.draft("warm", 0, PROMPT, 4, GREEDY)
            client.close("warm")
            baseline = child.rss()
            for i in range(3):
                stub.OpenSession(drafter_pb2.OpenSessionRequest(session_id=f"s{i}", tokens=PROMPT), timeout=60)
            with pytest.raises(grpc.RpcError) as err:
                stub.OpenSession(drafter_pb2.OpenSessionRequest(session_id="s3", tokens=PROMPT), timeout=60)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = err.value.details()
            assert "host memory budget" in details and str(limit) in details and str(big_cost) in details, details
            held, deadline = child.rss(), time.monotonic() + 30
            while child.rss() - baseline >= big_cost / 2 and time.monotonic() < deadline:
                time.sleep(0.25)                      # the reaper evicts them after 3 s idle
            after = child.rss()
            numbers = f"baseline {_mb(baseline)}, 3 sessions {_mb(held)}, after eviction {_mb(after)}"
            assert held - baseline > 0.8 * 3 * big_cost and after - baseline < big_cost / 2, numbers
            stub.OpenSession(drafter_pb2.OpenSessionRequest(session_id="s3", tokens=PROMPT), timeout=60)
    finally:
        child.stop()
