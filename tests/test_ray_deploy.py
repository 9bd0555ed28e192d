"""Pools on a real local Ray cluster (`ray start --head` on 127.0.0.1), driven by the real CLI.

One verifier, two drafters (CPU resources, the drafters also on a custom resource) and an
OpenAI HTTP gateway come up from one deployment file; the real `openai` client through the
gateway gets the gRPC path's greedy text; concurrent generations through the SDK equal
in-process AR while a drafter actor is killed (ray.kill) and while the drafter pool shrinks and
grows; `ray down` and stopping Ray leave no process behind (every process the cluster started
carries a tag in its environment, which is how they are found afterwards). Bad deployment files
fail `ray up` before Ray is touched.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import openai
import psutil
import pytest
import yaml

from equality import assert_greedy_equal
from sparsespec.client import SparseSpecClient
from sparsespec.deploy.autoscale import PoolAutoscaler
from sparsespec.deploy.config import DeployConfig, load_config
from sparsespec.deploy.serve_app import PoolsApp
from sparsespec.errors import InvalidArgument, SparseSpecError
from sparsespec.models import load_model, load_tokenizer
from sparsespec.models.testing import save_random_model, tiny_config
from sparsespec.spec.loop import GenerationRequest, SpecEngine

# Alone, after the parallel pass (scripts/test.sh): under pytest-xdist the head of the local Ray
# cluster started, then refused connections while another worker loaded the 2 cores.
pytestmark = pytest.mark.serial

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
PROMPTS = ["In the beginning God created the heaven and the earth. ",
           "And the earth was without form, and void; and darkness was upon the face of the deep. ",
           "And the Spirit of God moved upon the face of the waters. ",
           "And God said, Let there be light: and there was light. "]
MAX_TOKENS = 160
NAME = "sstest"
TAG_VAR = "SPARSESPEC_RAY_TEST_TAG"
os.environ.update(RAY_ENV)   # Ray reads these when it is imported: before `import ray` here


# ---- validation: no Ray needed ----------------------------------------------------------------

def good(**over):
    data = {"model": "/models/m", "redis_url": "redis://127.0.0.1:6379/0",
            "pools": {"verifier": {"replicas": 1}, "drafter": {"replicas": 2, "resources": {"CPU": 0.5}}}}
    data.update(over)
    return data


BAD = {
    "unknown pool": (good(pools={"verifier": {}, "drafters": {"replicas": 2}}), "pools.drafters: unknown pool"),
    "zero verifiers": (good(pools={"verifier": {"replicas": 0}}), "pools.verifier.replicas: must be >= 1"),
    "verifier min 0": (good(pools={"verifier": {"replicas": 1, "min_replicas": 0, "max_replicas": 2}}),
                       "pools.verifier.min_replicas: must be >= 1"),
    "no verifier pool": (good(pools={"drafter": {"replicas": 1}}), "pools.verifier: is required"),
    "missing model": ({k: v for k, v in good().items() if k != "model"}, "model: is required"),
    "no redis": (good(redis_url=""), "redis_url: is required"),
    "replicas above max": (good(pools={"verifier": {"replicas": 3, "max_replicas": 2}}),
                           "pools.verifier.replicas: must lie in [min_replicas, max_replicas]"),
    "negative GPU": (good(pools={"verifier": {"resources": {"GPU": -1}}}), "pools.verifier.resources.GPU"),
    "managed flag": (good(pools={"verifier": {"args": {"redis": "redis://x"}}}), "pools.verifier.args.redis"),
    "unknown key": (good(pool={}), "pool: unknown key"),
    "unknown pool key": (good(pools={"verifier": {"replica": 2}}), "pools.verifier.replica: unknown key"),
    "bad dtype": (good(dtype="float8"), "dtype:"),
    "gateway without the verifiers' CA": (
        good(pools={"verifier": {"args": {"tls_cert": "/c.pem", "tls_key": "/k.pem"}}, "gateway": {}}),
        "pools.gateway.args.verifier_tls_ca: is required: the verifiers serve TLS"),
    "gateway CA, plaintext verifiers": (good(pools={"verifier": {}, "gateway": {"args": {"verifier_tls_ca": "/ca"}}}),
                                        "pools.gateway.args.verifier_tls_ca: the verifiers serve plaintext"),
    "gateway behind mTLS verifiers": (
        good(pools={"verifier": {"args": {"tls_cert": "/c", "tls_key": "/k", "tls_client_ca": "/ca"}},
                    "gateway": {"args": {"verifier_tls_ca": "/ca"}}}),
        "pools.gateway: the verifiers require client certificates"),
    "gateway managed flag": (good(pools={"verifier": {}, "gateway": {"args": {"model": "x"}}}),
                             "pools.gateway.args.model: is set by the deployment"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_names_the_field(case):
    data, needle = BAD[case]
    with pytest.raises(InvalidArgument) as err:
        DeployConfig.from_dict(data)
    assert str(err.value).startswith(needle), str(err.value)


def test_resource_shape_and_flags():
    cfg = DeployConfig.from_dict(good(pools={
        "verifier": {"resources": {"CPU": 4, "GPU": 1, "accelerator_type:H100": 0.001}, "args": {"max_batch": 16}},
        "drafter": {"replicas": 2, "min_replicas": 1, "max_replicas": 8,
                    "resources": {"GPU": 1, "accelerator_type:A10G": 0.001, "memory": 8e9},
                    "args": {"budget": 256, "policy": "snapkv"}}}))
    v, d = cfg.pools["verifier"], cfg.pools["drafter"]
    assert v.ray_options() == {"num_cpus": 4.0, "num_gpus": 1.0, "resources": {"accelerator_type:H100": 0.001}}
    assert d.ray_options() == {"num_cpus": 0.0, "num_gpus": 1.0, "memory": 8e9,
                               "resources": {"accelerator_type:A10G": 0.001}}
    assert v.service_flags() == ["--max-batch", "16"] and not v.autoscaled and d.autoscaled
    assert d.service_flags() == ["--budget", "256", "--policy", "snapkv"]
    assert DeployConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("args, needle", [
    ({"verifier": {"max_bach": 8}}, "pools.verifier.args: unknown flag --max-bach (see sparsespec serve verifier --help)"),
    ({"drafter": {"budget": 16, "polcy": "x"}}, "pools.drafter.args: unknown flag --polcy"),
    ({"verifier": {"k": "four"}}, "pools.verifier.args: argument -k: invalid int value: 'four'"),
])
def test_service_flags_are_checked_against_the_services_parsers(args, needle):
    from sparsespec.deploy.flags import check_service_flags
    pools = {"verifier": {"args": args.get("verifier", {})}, "drafter": {"args": args.get("drafter", {})}}
    with pytest.raises(InvalidArgument) as err:
        check_service_flags(DeployConfig.from_dict(good(pools=pools)))
    assert str(err.value).startswith(needle), str(err.value)
    check_service_flags(DeployConfig.from_dict(good()))      # the defaults pass


def test_gateway_pool_takes_the_verifiers_keys_and_certificate():
    """A gateway replica: the deployment's model and Redis, no worker id or dtype (it registers
    nothing, loads no weights), the verifier pool's --api-keys/--tls-cert/--tls-key unless its own
    args set them, and its own args checked against the gateway's parser."""
    from sparsespec.deploy.flags import check_service_flags
    cfg = DeployConfig.from_dict(good(pools={
        "verifier": {"args": {"api_keys": "/keys", "tls-cert": "/c.pem", "tls_key": "/k.pem", "max_batch": 8}},
        "gateway": {"replicas": 2, "port": 8000, "resources": {"CPU": 0.5},
                    "args": {"verifier_tls_ca": "/ca.pem", "tls_key": "/own-key.pem"}}}))
    worker, flags = cfg.replica_flags("gateway", 1)
    assert flags == ["--model", "/models/m", "--redis", "redis://127.0.0.1:6379/0", "--port", "8000",
                     "--verifier-tls-ca", "/ca.pem", "--tls-key", "/own-key.pem", "--api-keys", "/keys",
                     "--tls-cert", "/c.pem"]
    _, vflags = cfg.replica_flags("verifier", 0)
    assert vflags[vflags.index("--worker-id") + 1] == "sparsespec-verifier-0" and "--tls-cert" in vflags
    check_service_flags(cfg)
    assert DeployConfig.from_dict(cfg.to_dict()) == cfg
    typo = DeployConfig.from_dict(good(pools={"verifier": {}, "gateway": {"args": {"max_bach": 8}}}))
    with pytest.raises(InvalidArgument, match=r"^pools.gateway.args: unknown flag --max-bach \(see sparsespec serve gateway"):
        check_service_flags(typo)


def test_example_files_are_valid(monkeypatch):
    from pathlib import Path
    examples = Path(__file__).resolve().parents[1] / "deploy" / "ray"
    cpu = load_config(str(examples / "cpu.yaml"))
    assert cpu.pools["drafter"].autoscaled and cpu.redis_url.startswith("redis://")
    monkeypatch.setenv("SPARSESPEC_REDIS_URL", "redis://:secret@redis:6379/0")   # gpu.yaml keeps it out
    gpu = load_config(str(examples / "gpu.yaml"))
    from sparsespec.deploy.flags import check_service_flags
    check_service_flags(cpu)
    check_service_flags(gpu)
    assert gpu.redis_url == "redis://:secret@redis:6379/0"
    assert gpu.pools["drafter"].ray_options()["resources"] == {"accelerator_type:A10G": 0.001}
    assert gpu.pools["verifier"].ray_options()["resources"] == {"accelerator_type:H100": 0.001}


def test_cli_refuses_a_bad_file_before_touching_ray(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(BAD["zero verifiers"][0]))
    out = subprocess.run([sys.executable, "-m", "sparsespec", "ray", "up", "--config", str(path),
                          "--address", "127.0.0.1:1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out
    assert out.stderr.strip().splitlines() == [
        "error: pools.verifier.replicas: must be >= 1 (a deployment without verifiers cannot generate), got 0"]


def test_no_cluster_at_the_address_fails_in_seconds():
    port = free_port()        # nothing listens there
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "sparsespec", "ray", "status", "--address", f"127.0.0.1:{port}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and time.monotonic() - t0 < 60, out
    assert out.stderr.startswith(f"error: address: no Ray cluster answers at 127.0.0.1:{port}"), out.stderr


def test_autoscaler_grows_at_once_and_shrinks_after_the_delay():
    a = PoolAutoscaler(min_replicas=1, max_replicas=4, target_load=8, downscale_delay_s=60)
    assert a.decide(0, current=1, total_load=17) == 3          # ceil(17 / 8)
    assert a.decide(1, current=3, total_load=100) == 4         # clamped to max
    assert a.decide(2, current=4, total_load=0) == 4           # low since t=2 ...
    assert a.decide(30, current=4, total_load=3) == 4
    assert a.decide(62, current=4, total_load=3) == 1          # ... held 60 s: shrink to want
    assert a.decide(63, current=1, total_load=0) == 1          # never below min
    assert a.decide(64, current=1, total_load=9) == 2
    assert a.decide(65, current=2, total_load=0) == 2          # a new lull starts its own clock


# ---- the real cluster ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tagged(tag: str) -> list[str]:
    """Live (non-zombie) processes whose environment carries this test's tag."""
    found = []
    for p in psutil.process_iter(["pid", "name", "status", "cmdline"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and p.environ().get(TAG_VAR) == tag:
                found.append(f"{p.pid} {' '.join(p.info['cmdline'] or [p.info['name']])[:120]}")
        except psutil.Error:
            continue
    return found


def wait_for(what, predicate, timeout_s: float, every_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = tiny_config(max_position_embeddings=1024, eos_token_ids=(), num_layers=4)
    return save_random_model(tmp_path_factory.mktemp("ray") / "model", cfg, seed=11)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """`ray start --head --block` on 127.0.0.1 with 4 CPUs and 3 `drafter_slot`s; SIGTERM to it
    stops every process of the cluster. Yields (address, env, tag)."""
    tag = uuid.uuid4().hex
    env = {**os.environ, **RAY_ENV, TAG_VAR: tag}
    port = free_port()
    temp_dir = str(tmp_path_factory.mktemp("ray-tmp"))
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
           "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4", '--resources={"drafter_slot": 3}',
           "--include-dashboard=false", f"--dashboard-port={free_port()}",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           "--object-store-memory=80000000", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in head.stdout:
        lines.append(line)
        if "Ray runtime started" in line:
            break
    assert head.poll() is None, "".join(lines[-20:])
    threading.Thread(target=lambda: [None for _ in head.stdout], daemon=True).start()
    try:
        yield f"127.0.0.1:{port}", env, tag
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(60)
        deadline = time.monotonic() + 30
        while tagged(tag) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = tagged(tag)
        assert not left, "processes left behind after Ray stopped:\n" + "\n".join(left)


@pytest.fixture(scope="module")
def reference(model_dir):
    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    engine = SpecEngine(model, None, eos_ids=[tokenizer.eos_token_id])

    def check(prompt: str, tokens: list[int], label: str):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        expected = engine.generate(GenerationRequest(ids, MAX_TOKENS, mode="ar")).token_ids
        assert_greedy_equal(model, ids, expected, tokens, label)

    return check


def sparsespec(env, *args, timeout=300) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "sparsespec", *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"sparsespec {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out


class Generations:
    """Concurrent streamed generations, one SDK client each; `started` is set once every stream
    has received tokens, so a test can act mid-generation."""

    def __init__(self, addresses: list[str], prompts: list[str], spread: bool = False):
        """spread: session i starts on addresses[i % n] (the SDK tries its list in order)."""
        self.prompts, self.outs, self.metrics, self.errors = prompts, {}, {}, []
        self._first = [threading.Event() for _ in prompts]
        order = [addresses[i % len(addresses):] + addresses[:i % len(addresses)] if spread else addresses
                 for i in range(len(prompts))]
        self.threads = [threading.Thread(target=self._one, args=(i, order[i])) for i in range(len(prompts))]
        for t in self.threads:
            t.start()

    def _one(self, i, addresses):
        try:
            with SparseSpecClient(addresses, reconnect_timeout_s=60) as c:
                tokens = []
                for chunk in c.stream(self.prompts[i], max_tokens=MAX_TOKENS, k=4):
                    tokens += chunk.token_ids
                    self._first[i].set()
                    if chunk.finished:
                        self.metrics[i] = chunk.metrics
                self.outs[i] = tokens
        except Exception as e:  # noqa: BLE001 - reported by join()
            self.errors.append(e)
        finally:
            self._first[i].set()

    def wait_started(self, timeout_s=120):
        for e in self._first:
            assert e.wait(timeout_s)

    def join(self, reference, label):
        for t in self.threads:
            t.join(300)
        assert not self.errors, self.errors
        for i, p in enumerate(self.prompts):
            reference(p, self.outs[i], f"{label} session {i}")
        return self


def test_pools_on_ray_lose_no_token(ray_cluster, model_dir, redis_srv, reference, tmp_path):
    import ray

    address, env, tag = ray_cluster
    redis_srv.start()
    cfg = {"name": NAME, "model": str(model_dir), "redis_url": redis_srv.url,
           "autoscale": {"interval_s": 3600},
           "pools": {"verifier": {"replicas": 1, "max_replicas": 2, "resources": {"CPU": 1},
                                  "args": {"max_batch": 8, "k": 4, "lease_ms": 1500, "drain_s": 10}},
                     "drafter": {"replicas": 2, "min_replicas": 1, "max_replicas": 3,
                                 "resources": {"CPU": 0.5, "drafter_slot": 1},
                                 "args": {"policy": "chunk_topk", "budget": 16, "threads": 1}},
                     "gateway": {"replicas": 1, "resources": {"CPU": 0.25}}}}
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(cfg))

    t0 = time.monotonic()
    up = sparsespec(env, "ray", "up", "--config", str(path), "--address", address).stdout.splitlines()
    ready = [line for line in up if line.startswith("ready ")]
    assert ready, up
    verifiers = ready[0].split()[1].split(",")
    assert len(verifiers) == 1 and sum(line.startswith("drafter ") for line in up) == 2, up
    http = [line.split()[1] for line in up if line.startswith("http ")]
    assert len(http) == 1 and http[0].startswith("http://127.0.0.1:") and f"gateway gateway-0 {http[0]} ready" in up, up
    print(f"ray up: {time.monotonic() - t0:.1f}s")
    # The tag finds the cluster's processes (so the "nothing left" checks below can fail).
    running = "\n".join(tagged(tag))
    for name in ("gcs_server", "raylet", "-m verifier_service", "-m drafter_service", "-m sparsespec.gateway"):
        assert name in running, (name, running)

    ray.init(address=address, namespace=NAME, logging_level="WARNING", log_to_driver=False)
    try:
        from sparsespec.deploy import connect
        dep = connect(NAME, address)
        from kvstore.coord.registry import WorkerRegistry
        registry = WorkerRegistry(redis_srv.url)
        assert sorted(w.worker_id for w in registry.live("drafter")) == [f"{NAME}-drafter-0", f"{NAME}-drafter-1"]

        # 1. A drafter actor is killed while every session streams.
        t1 = time.monotonic()
        gens = Generations(verifiers, PROMPTS)
        gens.wait_started()
        busiest = max(registry.live("drafter"), key=lambda w: w.load).worker_id   # the one holding sessions
        victim = "drafter-" + busiest.rsplit("-", 1)[1]
        ray.kill(ray.get_actor(victim, namespace=NAME))
        t_kill = time.monotonic() - t1
        gens.join(reference, "drafter killed")
        print(f"kill at {t_kill:.2f}s of a {time.monotonic() - t1:.2f}s batch ({victim})")
        failures = sum(m.get("drafter_failures", 0) for m in gens.metrics.values())
        assert failures >= 1, gens.metrics          # the kill did land mid-generation
        survivor = {"drafter-0": "drafter-1", "drafter-1": "drafter-0"}[victim]
        wait_for(f"the controller to replace {victim}",
                 lambda: {r["name"] for r in dep.status()["pools"]["drafter"]["replicas"] if r["state"] == "ready"}
                 == {survivor, "drafter-2"}, 120)
        assert dep.status()["pools"]["drafter"]["replaced"] == 1

        # The gateway pool's replica: the real openai client gets the gRPC path's greedy text
        # (which the SDK runs check against AR), with the drafters drafting. Not before step 1: it
        # kills the drafter reporting the most sessions, and these two, parked, would skew that.
        t_http = time.monotonic()
        with SparseSpecClient(verifiers) as sdk:
            ref = sdk.generate(PROMPTS[0], max_tokens=24, k=4)
        oai = openai.OpenAI(base_url=http[0] + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = oai.completions.create(model=str(model_dir), prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                   extra_body={"k": 4})
        assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length", (r, ref.text)
        assert r.usage.completion_tokens == 24 and r.model_extra["spec_decode"]["num_draft_tokens"] > 0
        print(f"gateway check: {time.monotonic() - t_http:.2f}s")

        # 2. The pool shrinks (a drafter with sessions is stopped gracefully) while sessions stream.
        gens = Generations(verifiers, PROMPTS[::-1])
        gens.wait_started()
        sparsespec(env, "ray", "scale", "drafter", "1", "--name", NAME, "--address", address)
        gens.join(reference, "scaled down")
        wait_for("one drafter", lambda: len(registry.live("drafter")) == 1 and len(dep.addresses("drafter")) == 1, 60)

        # 3. ... and grows back while sessions stream. The Serve application's health check (what
        # KubeRay's RayService watches) fails while the pool is below size.
        app = PoolsApp(str(path), address)
        app.check_health()
        gens = Generations(verifiers, PROMPTS)
        gens.wait_started()
        sparsespec(env, "ray", "scale", "drafter", "3", "--name", NAME, "--address", address)
        with pytest.raises(SparseSpecError, match="^pools below size: drafter: 1/3 ready$"):
            app.check_health()
        gens.join(reference, "scaling up")
        dep.wait_ready(120)
        app.check_health()
        assert app.status()["verifiers"] == verifiers
        assert len(registry.live("drafter")) == 3

        # 4. A second verifier joins, sessions spread over both, and the pool shrinks back to one
        # while they stream: the removed verifier drains its turns (or the SDK resumes them).
        sparsespec(env, "ray", "scale", "verifier", "2", "--wait", "--name", NAME, "--address", address)
        both = dep.verifier_addresses()
        assert len(both) == 2 and len(registry.live("verifier")) == 2
        gens = Generations(both, PROMPTS, spread=True)
        gens.wait_started()
        sparsespec(env, "ray", "scale", "verifier", "1", "--name", NAME, "--address", address)
        gens.join(reference, "verifier removed")
        wait_for("one verifier", lambda: len(registry.live("verifier")) == 1 and len(dep.verifier_addresses()) == 1, 60)
        assert all(m["rounds"] > 0 for m in gens.metrics.values())

        # Out-of-range scale and an unknown pool are refused with the field named.
        bad = subprocess.run([sys.executable, "-m", "sparsespec", "ray", "scale", "drafter", "9", "--name", NAME,
                              "--address", address], env=env, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "error: replicas: pool drafter takes [1, 3]" in bad.stderr, bad.stderr
        with pytest.raises(SparseSpecError, match="^pool: unknown pool 'drafters'"):
            dep.scale("drafters", 1)
    finally:
        ray.shutdown()
    sparsespec(env, "ray", "down", "--name", NAME, "--address", address)
    wait_for("every service process to exit",
             lambda: not [p for p in tagged(tag) if "_service" in p or "ServiceReplica" in p
                          or "sparsespec.gateway" in p] or None, 30)
    assert registry.live("drafter") == [] and registry.live("verifier") == []
    print(f"whole run: {time.monotonic() - t0:.1f}s")


def test_a_replica_that_cannot_start_fails_up_with_its_error(ray_cluster, redis_srv, tmp_path):
    """A model path that does not exist on the node: `ray up` fails with the service's own
    message, and leaves no deployment behind."""
    address, env, tag = ray_cluster
    redis_srv.start()
    cfg = {"name": "ssbad", "model": str(tmp_path / "no-such-model"), "redis_url": redis_srv.url,
           "pools": {"verifier": {"replicas": 1, "max_replicas": 2, "resources": {"CPU": 1}, "start_timeout_s": 120}}}
    path = tmp_path / "bad-model.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "sparsespec", "ray", "up", "--config", str(path),
                          "--address", address], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out
    assert out.stderr.startswith("error: pools.verifier: a replica did not start: verifier-0: verifier exited"), \
        out.stderr
    assert "no-such-model" in out.stderr
    status = subprocess.run([sys.executable, "-m", "sparsespec", "ray", "status", "--name", "ssbad",
                             "--address", address], env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 2 and "error: name: no deployment named 'ssbad'" in status.stderr, status.stderr
