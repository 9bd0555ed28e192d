"""The disaggregated system end to end: real redis-server, real service processes, real gRPC on
127.0.0.1, the client SDK. Outputs are compared with the in-process AR decode of the same model.
"""

from __future__ import annotations

import json
import threading

import grpc
import pytest
import torch

from equality import assert_greedy_equal
from sparsespec.client import GenerationError, SparseSpecClient
from sparsespec.cluster import ClusterConfig, LocalCluster
from sparsespec.models import load_model, load_tokenizer
from sparsespec.models.testing import save_random_model, tiny_config
from sparsespec.rpc.sparsespec.v1 import generation_pb2 as pb
from sparsespec.rpc.sparsespec.v1 import generation_pb2_grpc as pb_grpc
from sparsespec.spec.loop import GenerationRequest, SpecEngine

PROMPT = "In the beginning God created the heaven and the earth. And the earth was without form. "


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = tiny_config(max_position_embeddings=2048, eos_token_ids=(), num_layers=4)
    return save_random_model(tmp_path_factory.mktemp("svc") / "model", cfg, seed=5)


@pytest.fixture(scope="module")
def reference(model_dir):
    """In-process AR decoding: the truth every service output must equal."""
    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    engine = SpecEngine(model, None, eos_ids=[tokenizer.eos_token_id])   # stops where the service does

    def ar(prompt_ids: list[int], max_tokens: int) -> list[int]:
        return engine.generate(GenerationRequest(prompt_ids, max_tokens, mode="ar")).token_ids

    def check(prompt_ids, tokens, label="", max_tokens=None):
        """Equal to AR (same stopping); with max_tokens, also of the same length as AR's."""
        expected = ar(prompt_ids, max_tokens or len(tokens))
        assert_greedy_equal(model, prompt_ids, expected, tokens, label)

    ar.check, ar.encode = check, lambda text: tokenizer.encode(text, add_special_tokens=False)
    return ar


@pytest.fixture(scope="module")
def cluster(model_dir, redis_srv):
    redis_srv.start()
    with LocalCluster(ClusterConfig(model=str(model_dir), policy="chunk_topk", budget="16", k=4,
                                    lease_ms=1500), redis_url=redis_srv.url) as c:
        yield c


@pytest.fixture
def client(cluster):
    with SparseSpecClient([v.address for v in cluster.verifiers], reconnect_timeout_s=30) as c:
        yield c


@pytest.mark.parametrize("k", [1, 4, 8])
def test_greedy_through_services_equals_ar(client, reference, k):
    done = client.generate(PROMPT, max_tokens=48, k=k)
    reference.check(reference.encode(PROMPT), done.token_ids, f"k={k}", max_tokens=48)
    m = done.metrics
    assert m["rounds"] > 0 and m["drafter_failures"] == 0
    assert m["drafter_kv_device_bytes"] > 0 and done.text


def test_token_ids_prompt_and_ar_mode(client, reference):
    ids = reference.encode(PROMPT * 3)
    spec = client.generate(ids, max_tokens=32)
    ar = client.generate(ids, max_tokens=32, mode="ar")
    assert spec.token_ids == ar.token_ids
    reference.check(ids, spec.token_ids, "token ids")
    assert ar.metrics["rounds"] == 0 and ar.metrics["ar_steps"] == len(ar.token_ids)


def test_eight_concurrent_sessions(cluster, reference):
    prompts = [PROMPT[i:] + PROMPT[:i] for i in range(0, 80, 10)]
    outs: dict[int, list[int]] = {}
    errors = []

    def one(i):
        try:
            with SparseSpecClient(cluster.address) as c:
                outs[i] = c.generate(prompts[i], max_tokens=40, k=1 + i % 5).token_ids
                assert outs[i]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for i, p in enumerate(prompts):
        reference.check(reference.encode(p), outs[i], f"session {i}", max_tokens=40)


def test_fed_int8_drafter_drafts_concurrent_sessions_through_services(model_dir, redis_srv, reference):
    """The default drafter (fed: the verifier's K/V, no prefill, no host tier) as a low-memory
    process (--drafter-weights int8), 4 sessions drafted together (one DraftBatch stream per
    round, feeds in it), then a second turn: every output is still the verifier's own."""
    redis_srv.start()
    prompts = [PROMPT[i:] + PROMPT[:i] for i in range(0, 40, 10)]
    outs: dict[int, object] = {}
    with LocalCluster(ClusterConfig(model=str(model_dir), budget="16", k=3,
                                    drafter_weights="int8"), redis_url=redis_srv.url) as c:
        def one(i):
            with SparseSpecClient(c.address) as client:
                outs[i] = client.generate(prompts[i], max_tokens=32)
                if i == 0:
                    turn = " And God said, Let there be light."
                    outs["turn"] = client.generate(turn, session_id=client.last_session, max_tokens=24)
                    outs["context"] = reference.encode(prompts[0]) + outs[0].token_ids + reference.encode(turn)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    assert set(outs) == set(range(len(prompts))) | {"turn", "context"}
    for i, p in enumerate(prompts):
        reference.check(reference.encode(p), outs[i].token_ids, f"int8 session {i}", max_tokens=32)
        m = outs[i].metrics
        assert m["accepted"] > 0 and m["drafter_failures"] == 0
        assert m["feeds_sent"] > 0 and m["drafter_kv_host_bytes"] == 0
    reference.check(outs["context"], outs["turn"].token_ids, "fed second turn", max_tokens=24)
    assert outs["turn"].metrics["drafter_failures"] == 0 and outs["turn"].metrics["rounds"] > 0


def test_multi_turn_reuses_both_caches(client, reference):
    first = client.generate(PROMPT, max_tokens=24)
    session = client.last_session
    second = client.generate(" And God said, Let there be light.", session_id=session, max_tokens=24)
    assert second.session_id == session
    context = reference.encode(PROMPT) + first.token_ids + reference.encode(" And God said, Let there be light.")
    reference.check(context, second.token_ids, "second turn")
    # The verifier row and the drafter kept the first turn: only the new tokens were prefilled.
    assert second.metrics["reused_prefix_tokens"] >= len(reference.encode(PROMPT)) + len(first.token_ids) - 1
    assert second.metrics["drafter_failures"] == 0


def grpc_generate(address, **fields):
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.GenerationStub(ch)
        return list(stub.Generate(pb.GenerateRequest(**fields), timeout=60))


BAD = {
    "empty prompt": (dict(text="", max_tokens=4), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    "token id >= vocab": (dict(token_ids=pb.TokenIds(ids=[5, 128]), max_tokens=4),
                          grpc.StatusCode.INVALID_ARGUMENT, "token_ids"),
    "max_tokens 0": (dict(text="hi", max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    "max_tokens -3": (dict(text="hi", max_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    "k 65": (dict(text="hi", max_tokens=4, k=65), grpc.StatusCode.INVALID_ARGUMENT, "k"),
    "k -1": (dict(text="hi", max_tokens=4, k=-1), grpc.StatusCode.INVALID_ARGUMENT, "k"),
    "prompt over context": (dict(text="x" * 2100, max_tokens=4), grpc.StatusCode.OUT_OF_RANGE, "prompt"),
    "unknown session": (dict(session_id="no-such-session", resume=True, max_tokens=4),
                        grpc.StatusCode.NOT_FOUND, "session_id"),
    "10 MB message": (dict(text="a" * (10 << 20), max_tokens=4), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    "top_p 2": (dict(text="hi", max_tokens=4, sampling={"temperature": 1.0, "top_p": 2.0}),
                grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gets_status_and_service_keeps_serving(cluster, client, reference, case):
    fields, code, needle = BAD[case]
    with pytest.raises(grpc.RpcError) as err:
        grpc_generate(cluster.address, **fields)
    assert err.value.code() == code, (err.value.code(), err.value.details())
    details = err.value.details() or ""
    assert needle in details and "Traceback" not in details, details
    done = client.generate(PROMPT, max_tokens=8)     # still serving
    reference.check(reference.encode(PROMPT), done.token_ids, "after bad input")


def test_health_and_model_info(cluster, client):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(cluster.address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    info = client.model_info()
    assert info["vocab_size"] == 128 and info["max_context"] == 2048 and info["num_layers"] == 4


def test_sdk_bad_input_is_not_retried(client):
    with pytest.raises(GenerationError) as err:
        client.generate(PROMPT, max_tokens=0)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in err.value.message


def test_async_client_streams_the_same_tokens(cluster, client):
    import asyncio

    from sparsespec.client import AsyncSparseSpecClient

    async def run():
        c = AsyncSparseSpecClient(cluster.address)
        try:
            return await c.generate(PROMPT, max_tokens=24, k=4)
        finally:
            await c.close()

    done = asyncio.run(run())
    assert done.token_ids == client.generate(PROMPT, max_tokens=24, k=4).token_ids and done.text


def test_sparsespec_up_and_generate_server(model_dir, tmp_path):
    """`sparsespec up` prints `ready HOST:PORT`; `generate --server` prints the same JSON shape
    and tokens as in-process; Ctrl-C stops every process."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    up = subprocess.Popen([sys.executable, "-m", "sparsespec", "up", "--model", str(model_dir), "--budget", "16"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in up.stdout:
            lines.append(line)
            if line.startswith("ready "):
                break
        assert lines and lines[-1].startswith("ready "), "".join(lines)
        address = lines[-1].split()[1]
        common = ["--prompt", PROMPT, "--max-tokens", "16", "--json"]
        remote = subprocess.run([sys.executable, "-m", "sparsespec", "generate", "--server", address, *common],
                                capture_output=True, text=True, env=env, timeout=120)
        local = subprocess.run([sys.executable, "-m", "sparsespec", "generate", "--model", str(model_dir),
                                "--mode", "ar", *common], capture_output=True, text=True, env=env, timeout=120)
        assert remote.returncode == 0 and local.returncode == 0, remote.stderr + local.stderr
        r, l = json.loads(remote.stdout), json.loads(local.stdout)
        assert r["token_ids"] == l["token_ids"] and r["text"] == l["text"]
        assert r["metrics"]["rounds"] > 0 and "tokens_per_s" in r["metrics"]
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0


@pytest.mark.parametrize("service", ["verifier_service", "drafter_service"])
@pytest.mark.parametrize("device,message", [("gpu", "expected cpu, cuda or cuda:N"),
                                            ("cuda:x", "expected cpu, cuda or cuda:N")]
                         + ([] if torch.cuda.is_available() else [("cuda", "CUDA is not available")]))
def test_device_flag_is_checked_before_loading(model_dir, service, device, message):
    import os
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", service, "--model", str(model_dir), "--redis",
                           "redis://127.0.0.1:1/0", "--device", device], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: device: '{device}'" if "CUDA" in message
                                                            else "error: device: "), proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
