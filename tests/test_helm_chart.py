"""The Helm chart, rendered and checked offline: no helm binary, no cluster.

helm-python-sdk renders and lints with Helm's own Go SDK (v4), which the wheel ships as a shared
library, so `required`/`fail` in templates and values.schema.json run exactly as `helm template`
runs them. Every rendered manifest must pass kubernetes-validate --strict (unknown fields are
errors) against the oldest Kubernetes the chart supports and the newest schema we pin. The
probes must name the services' real gRPC health entries, and the container arguments the chart
renders must start the real services, which then answer those probes.
"""

from __future__ import annotations

import base64
import copy
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import helm_python as helm
import kubernetes_validate.utils as kv
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sparsespec.models.testing import save_random_model, tiny_config
from sparsespec.redis_server import PERSISTENCE

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "sparsespec"
VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSIONS = ("1.27.0", "1.37.0")     # the chart's kubeVersion floor, the newest pinned schema
HEALTH = {"verifier": "sparsespec.v1.Generation", "drafter": "sparsespec.v1.Drafter"}


def render(values: dict) -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name="rel", namespace="ns")
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def values_of(name: str) -> dict:
    return yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(docs, pool):
    return by_kind(docs, "Deployment")[f"rel-sparsespec-{pool}"]["spec"]["template"]["spec"]["containers"][0]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_the_three_ci_values_files_exist():
    assert [p.name for p in VALUES] == ["default-values.yaml", "external-redis-values.yaml", "gpu-values.yaml"]


@pytest.mark.parametrize("values_file", VALUES, ids=lambda p: p.stem)
def test_rendered_manifests_validate_strictly(values_file, tmp_path):
    values = yaml.safe_load(values_file.read_text())
    docs = render(values)
    kinds = sorted({d["kind"] for d in docs})
    assert {"Deployment", "Service", "PodDisruptionBudget"} <= set(kinds), kinds
    for doc in docs:
        for version in KUBE_VERSIONS:
            kv.validate(doc, version, strict=True)      # raises on any unknown or wrong field
    # The same through the command line, as a person would run it on the rendered files.
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    cli = Path(sys.executable).with_name("kubernetes-validate")
    for version in KUBE_VERSIONS:
        res = subprocess.run([str(cli), "--strict", "-k", version, str(out)], capture_output=True, text=True)
        assert res.returncode == 0 and "ERROR" not in res.stdout + res.stderr, res.stdout + res.stderr
    report = helm.lint(str(CHART), values, strict=True)
    assert report["errors"] == [] and all(m["severity"] < 2 for m in report["messages"]), report


def test_strict_validation_catches_an_unknown_field():
    """The validator above can fail: a misspelled probe field is an error."""
    deployment = copy.deepcopy(by_kind(render(values_of("default")), "Deployment")["rel-sparsespec-verifier"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["serviec"] = "x"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, "1.37.0", strict=True)


@pytest.mark.parametrize("values_file", VALUES, ids=lambda p: p.stem)
def test_probes_use_the_grpc_health_service(values_file):
    docs = render(yaml.safe_load(values_file.read_text()))
    for pool, service in HEALTH.items():
        c = container(docs, pool)
        port = int(flag(c["args"], "--port"))
        assert c["ports"][0] == {"name": "grpc", "containerPort": port, "protocol": "TCP"}
        assert [p["name"] for p in c["ports"][1:]] == ["metrics"]          # the probes never ask it
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert set(c[probe]) - {"periodSeconds", "failureThreshold"} == {"grpc"}, (pool, probe, c[probe])
            assert c[probe]["grpc"]["port"] == port
        assert c["readinessProbe"]["grpc"]["service"] == service
        assert c["startupProbe"]["grpc"]["service"] == service
        assert c["livenessProbe"]["grpc"]["service"] == ""


def test_probe_names_are_the_services_own():
    from drafter_service.servicer import SERVICE as DRAFTER
    from verifier_service.server import SERVICE as VERIFIER
    assert HEALTH == {"verifier": VERIFIER, "drafter": DRAFTER}


def test_gpu_pools_land_on_their_own_nodes():
    docs = render(values_of("gpu"))
    v, d = container(docs, "verifier"), container(docs, "drafter")
    pods = {p: by_kind(docs, "Deployment")[f"rel-sparsespec-{p}"]["spec"] for p in ("verifier", "drafter")}
    assert pods["verifier"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pods["drafter"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A10G"}
    for c in (v, d):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert c["image"] == "sparsespec:0.1.0-cuda"
    assert flag(d["args"], "--device") == "cuda" and flag(d["args"], "--drafter") == "layers:8"
    assert flag(v["args"], "--device") == "cuda"          # each pool computes on the GPU it requests
    assert d["args"][:2] == ["serve", "drafter"] and v["args"][:2] == ["serve", "verifier"]
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert sorted(hpas) == ["rel-sparsespec-drafter", "rel-sparsespec-verifier"]
    assert hpas["rel-sparsespec-drafter"]["spec"]["maxReplicas"] == 16
    assert all("replicas" not in spec for spec in pods.values())       # the HPA owns the count
    # The verifier's grace period covers its drain.
    assert pods["verifier"]["template"]["spec"]["terminationGracePeriodSeconds"] == 75
    assert flag(v["args"], "--drain-s") == "60"
    pdbs = by_kind(docs, "PodDisruptionBudget")
    assert pdbs["rel-sparsespec-drafter"]["spec"]["maxUnavailable"] == "25%"


def test_the_redis_password_travels_only_through_a_secret():
    docs = render(values_of("gpu"))
    secret = by_kind(docs, "Secret")["rel-sparsespec-redis"]
    assert secret["data"]["redis-password"] == "Y2hhbmdlLW1lLXRvLWEtbG9uZy1yYW5kb20tc3RyaW5n"
    rendered = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    assert "change-me-to-a-long-random-string" not in rendered
    v = container(docs, "verifier")
    assert flag(v["args"], "--redis") == "redis://:$(REDIS_PASSWORD)@rel-sparsespec-redis:6379/0"
    env = {e["name"]: e for e in v["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "rel-sparsespec-redis",
                                                                  "key": "redis-password"}
    redis = by_kind(docs, "Deployment")["rel-sparsespec-redis"]["spec"]["template"]["spec"]["containers"][0]
    assert redis["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]


def test_external_redis_renders_no_redis_and_reads_the_users_secret():
    docs = render(values_of("external-redis"))
    assert "rel-sparsespec-redis" not in by_kind(docs, "Deployment") and not by_kind(docs, "Secret")
    v = container(docs, "drafter")
    assert flag(v["args"], "--redis") == "rediss://:$(REDIS_PASSWORD)@redis.example.internal:6380/2"
    env = {e["name"]: e for e in v["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "redis-credentials", "key": "password"}


MODEL = {"model": {"path": "/models/m"}}


def redis_pod(docs) -> dict:
    return by_kind(docs, "Deployment")["rel-sparsespec-redis"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("mode", sorted(PERSISTENCE))
def test_bundled_redis_runs_the_persistence_flags_of_sparsespec_up(mode):
    """The same append-only file settings as sparsespec/redis_server.py (tests/test_durability.py
    restarts a Redis run with them and finds every committed token), on /data."""
    values = {**MODEL, "redis": {"persistence": {"mode": mode}}} if mode != "everysec" else MODEL   # the default
    pod = redis_pod(render(values))
    args = pod["containers"][0]["args"]
    assert args[:args.index("--dir")] == list(PERSISTENCE[mode]) and flag(args, "--dir") == "/data"
    assert pod["containers"][0]["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert pod["volumes"] == [{"name": "data", "emptyDir": {}}]          # lives as long as the pod


def test_bundled_redis_keeps_its_data_on_a_given_volume():
    pod = redis_pod(render(values_of("gpu")))
    assert pod["volumes"] == [{"name": "data", "persistentVolumeClaim": {"claimName": "sparsespec-redis"}}]
    assert flag(pod["containers"][0]["args"], "--appendfsync") == "everysec"


BAD = {
    "missing model path": ({}, "model.path is required"),
    "zero verifiers": ({**MODEL, "verifier": {"replicas": 0}}, "/verifier/replicas"),
    "verifier autoscaling from 0": ({**MODEL, "verifier": {"autoscaling": {"enabled": True, "minReplicas": 0}}},
                                    "/verifier/autoscaling/minReplicas"),
    "unknown pool": ({**MODEL, "drafters": {"replicas": 2}}, "additional properties 'drafters' not allowed"),
    "unknown pool key": ({**MODEL, "drafter": {"gpus": 1}}, "additional properties 'gpus' not allowed"),
    "flag the chart sets": ({**MODEL, "drafter": {"args": {"redis": "redis://x"}}},
                            "drafter.args.redis is set by the chart"),
    "external redis without host": ({**MODEL, "redis": {"bundled": False}},
                                    "redis.external.host is required when redis.bundled is false"),
    "auth without a password": ({**MODEL, "redis": {"auth": {"enabled": True}}},
                                "redis.auth.password or redis.auth.existingSecret is required"),
    "autoscaling min above max": ({**MODEL, "drafter": {"autoscaling": {"enabled": True, "minReplicas": 9,
                                                                         "maxReplicas": 2}}},
                                  "drafter.autoscaling.minReplicas (9) must be <= maxReplicas (2)"),
    "api keys without keys": ({**MODEL, "apiKeys": {"enabled": True}},
                              "apiKeys.keys or apiKeys.existingSecret is required"),
    "a short api key": ({**MODEL, "apiKeys": {"enabled": True, "keys": ["short"]}}, "/apiKeys/keys/0"),
    "tls without a secret": ({**MODEL, "tls": {"enabled": True}}, "tls.existingSecret is required"),
    "tls flag in args": ({**MODEL, "verifier": {"args": {"tls-cert": "/x"}}}, "verifier.args.tls-cert is set by the chart"),
    "health port on the serving port": ({**MODEL, "tls": {"enabled": True, "existingSecret": "t", "healthPort": 50051}},
                                        "tls.healthPort (50051) must differ"),
    "metrics on the serving port": ({**MODEL, "metrics": {"port": 50052}}, "metrics.port (50052) must differ"),
    "bad dtype": ({"model": {"path": "/m", "dtype": "float8"}}, "/model/dtype"),
    "bad redis persistence": ({**MODEL, "redis": {"persistence": {"mode": "no"}}}, "/redis/persistence/mode"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_values_fail_at_render_time_with_the_field(case):
    values, needle = BAD[case]
    with pytest.raises(helm.HelmError) as err:
        render(values)
    assert needle in str(err.value), str(err.value)


KEYS_AND_TLS = {**MODEL, "apiKeys": {"enabled": True, "keys": ["k" * 20, "second-key-0123456789"]},
                "tls": {"enabled": True, "existingSecret": "sparsespec-tls", "serverName": "sparsespec.ns.svc"}}


@pytest.mark.parametrize("client_auth", [True, False], ids=["mtls", "tls"])
def test_api_keys_and_tls_come_from_secrets_and_the_services_take_the_flags(client_auth):
    values = copy.deepcopy(KEYS_AND_TLS)
    values["tls"]["drafterClientAuth"] = client_auth
    docs = render(values)
    for doc in docs:
        kv.validate(doc, KUBE_VERSIONS[0], strict=True)
    secret = by_kind(docs, "Secret")["rel-sparsespec-api-keys"]
    assert base64.b64decode(secret["data"]["api-keys"]).decode() == "k" * 20 + "\nsecond-key-0123456789"
    assert "k" * 20 not in yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])   # only in the Secret
    from drafter_service.server import build_parser as drafter_parser
    from verifier_service.server import build_parser as verifier_parser
    pods = by_kind(docs, "Deployment")
    for pool, parser in (("verifier", verifier_parser), ("drafter", drafter_parser)):
        c = container(docs, pool)
        args = parser().parse_args(c["args"][2:])          # the service's own parser takes every flag
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pods[f"rel-sparsespec-{pool}"]["spec"]["template"]["spec"]["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "sparsespec-tls" and mounts["tls"] == "/etc/sparsespec/tls"
        assert (args.tls_cert, args.tls_key, args.health_port) == ("/etc/sparsespec/tls/tls.crt",
                                                                   "/etc/sparsespec/tls/tls.key", 8086)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):   # kubelet's probe has no TLS
            assert c[probe]["grpc"]["port"] == 8086
        if pool == "verifier":
            assert args.api_keys == "/etc/sparsespec/api-keys/keys" and mounts["api-keys"] == "/etc/sparsespec/api-keys"
            assert volumes["api-keys"]["secret"] == {"secretName": "rel-sparsespec-api-keys",
                                                     "items": [{"key": "api-keys", "path": "keys"}]}
            assert (args.drafter_tls_ca, args.drafter_tls_server_name) == ("/etc/sparsespec/tls/ca.crt",
                                                                           "sparsespec.ns.svc")
            assert args.drafter_tls_cert == ("/etc/sparsespec/tls/tls.crt" if client_auth else None)
        else:
            assert "api-keys" not in mounts and "--api-keys" not in c["args"]
            assert args.tls_client_ca == ("/etc/sparsespec/tls/ca.crt" if client_auth else None)
    # The HTTP gateway takes the same keys (401 without one), dials the verifiers with the CA and
    # serves HTTPS with the same certificate; its HTTP probes speak HTTPS.
    from sparsespec.gateway.server import build_parser as gateway_parser
    c = container(docs, "gateway")
    args = gateway_parser().parse_args(c["args"][2:])
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert (args.api_keys, args.verifier_tls_ca, args.verifier_tls_server_name) == (
        "/etc/sparsespec/api-keys/keys", "/etc/sparsespec/tls/ca.crt", "sparsespec.ns.svc")
    assert (args.tls_cert, args.tls_key) == ("/etc/sparsespec/tls/tls.crt", "/etc/sparsespec/tls/tls.key")
    assert mounts["api-keys"] == "/etc/sparsespec/api-keys" and mounts["tls"] == "/etc/sparsespec/tls"
    assert [c[p]["httpGet"]["scheme"] for p in ("readinessProbe", "livenessProbe")] == ["HTTPS", "HTTPS"]
    assert by_kind(docs, "Service")["rel-sparsespec-gateway"]["spec"]["ports"][0]["appProtocol"] == "https"
    plain = container(render(MODEL), "gateway")                  # TLS off: plain HTTP, no certificate
    assert "--tls-cert" not in plain["args"] and plain["readinessProbe"]["httpGet"]["scheme"] == "HTTP"


def test_metrics_port_on_every_pod_and_an_optional_service_monitor():
    docs = render({**MODEL, "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    from drafter_service.server import build_parser as drafter_parser
    from verifier_service.server import build_parser as verifier_parser
    for pool, parser in (("verifier", verifier_parser), ("drafter", drafter_parser)):
        c = container(docs, pool)
        assert parser().parse_args(c["args"][2:]).metrics_port == 9090
        assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in c["ports"]
        svc = by_kind(docs, "Service")[f"rel-sparsespec-{pool}-headless"]
        assert {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP",
                "appProtocol": "http"} in svc["spec"]["ports"]
    for doc in docs:
        if doc["kind"] != "ServiceMonitor":          # a CRD: no schema in kubernetes-validate
            kv.validate(doc, KUBE_VERSIONS[0], strict=True)
    sm = by_kind(docs, "ServiceMonitor")["rel-sparsespec"]
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    headless = [d for n, d in by_kind(docs, "Service").items() if n.endswith("-headless")]
    assert all(set(sm["spec"]["selector"]["matchLabels"].items()) <= set(d["metadata"]["labels"].items())
               for d in headless)
    assert "ServiceMonitor" not in {d["kind"] for d in render(MODEL)}          # off by default
    off = render({**MODEL, "metrics": {"enabled": False}})
    assert "--metrics-port" not in container(off, "verifier")["args"]


# ---- the rendered arguments start the real services, and the rendered probes pass ------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runnable(args: list[str], model_dir: Path, redis_url: str, port: int) -> list[str]:
    """The container's args with what Kubernetes would fill in replaced by local values."""
    out = [a.replace("$(POD_IP)", "127.0.0.1").replace("$(POD_NAME)", f"pod-{port}") for a in args]
    out[out.index("--model") + 1] = str(model_dir)
    out[out.index("--redis") + 1] = redis_url
    out[out.index("--port") + 1] = str(port)
    out[out.index("--host") + 1] = "127.0.0.1"      # the gateway binds every interface of its pod
    if "--metrics-port" in out:                    # each pod has its own IP; here they share one
        out[out.index("--metrics-port") + 1] = "0"
    return out


def health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def probe_passes(address: str, service: str) -> bool:
    """What kubelet's gRPC probe decides: success only for SERVING; NOT_FOUND (a verifier names
    its service a moment after it listens) or an error is a failed try, retried next period."""
    try:
        return health(address, service) == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def test_rendered_args_start_the_services_and_their_probes_pass(tmp_path, redis_url):
    model_dir = save_random_model(tmp_path / "model", tiny_config(eos_token_ids=()), seed=3)
    docs = render(values_of("default"))
    assert flag(container(docs, "drafter")["args"], "--drafter-weights") == "same"   # started below as-is
    procs = {}
    try:
        for pool in ("drafter", "verifier", "gateway"):
            c, port = container(docs, pool), free_port()
            cmd = [sys.executable, "-m", "sparsespec", *runnable(c["args"], model_dir, redis_url, port)]
            procs[pool] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                           f"127.0.0.1:{port}", c)
        gateway = procs.pop("gateway")
        for pool, (proc, address, c) in procs.items():
            line = proc.stdout.readline()
            while line and not line.startswith("listening "):
                line = proc.stdout.readline()
            assert line.strip() == f"listening {address}", (pool, line, proc.poll())
            metrics = proc.stdout.readline().split()            # the rendered --metrics-port serves
            assert metrics[0] == "metrics", metrics
            with urllib.request.urlopen(metrics[1], timeout=10) as r:
                assert b"sparsespec:" in r.read()
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                service = c[probe]["grpc"]["service"]
                deadline = time.monotonic() + 30
                while not probe_passes(address, service):
                    assert time.monotonic() < deadline, f"{pool} {probe} never SERVING"
                    time.sleep(0.2)
        from kvstore.coord.registry import WorkerRegistry
        drafters = WorkerRegistry(redis_url).live("drafter")
        assert [(w.worker_id, w.address) for w in drafters] == [(f"pod-{procs['drafter'][1].split(':')[1]}",
                                                                 procs["drafter"][1])]
        # A wrong service name is NOT found: the probe would fail, so the names above matter.
        with pytest.raises(grpc.RpcError) as err:
            health(procs["verifier"][1], "sparsespec.v1.Nope")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # The gateway, started from its rendered args, finds the verifier through Redis: its
        # readiness probe (/health, the data path) passes.
        proc, address, c = procs["gateway"] = gateway
        line = proc.stdout.readline()
        while line and not line.startswith("listening "):
            line = proc.stdout.readline()
        assert line.strip() == f"listening http://{address}", (line, proc.poll())
        probe = c["readinessProbe"]["httpGet"]
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://{address}{probe['path']}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the gateway's /health never passed"
            time.sleep(0.3)
    finally:
        for proc, _, _ in procs.values():
            proc.terminate()
        for proc, _, _ in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---- the KubeRay example ------------------------------------------------------------------------

def test_kuberay_rayservice_example_is_well_formed():
    """KubeRay's CRD schema is not in kubernetes-validate; its pod templates are core Kubernetes,
    so each is validated strictly as a PodTemplate, and the Serve application it names exists."""
    svc = yaml.safe_load((ROOT / "deploy" / "ray" / "kuberay-rayservice.yaml").read_text())
    assert (svc["apiVersion"], svc["kind"]) == ("ray.io/v1", "RayService")
    cluster = svc["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for i, template in enumerate(templates):
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"},
                     "template": template}, "1.37.0", strict=True)
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"verifier-h100", "drafter-a10g"}
    app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
    module, _, attr = app["import_path"].partition(":")
    import importlib
    assert callable(getattr(importlib.import_module(module), attr))
    assert app["args"]["config"].startswith("/etc/sparsespec/")
