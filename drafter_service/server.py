"""`python -m drafter_service`: a drafter as a gRPC server.

Loads the drafter model, builds the DrafterHost (sparsespec.spec.drafter_host, the host used in
process too: many sessions under a device- and a host-memory budget), serves the Drafter API plus
grpc.health.v1 (SERVING once the model is loaded), prints `listening HOST:PORT` and stops
gracefully on SIGTERM / SIGINT (health NOT_SERVING, in-flight calls finish within the grace
period, exit 0).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Callable

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from drafter_service.servicer import SERVICE, DrafterServicer
from sparsespec.build import EngineConfig, parse_budget, parse_dtype
from sparsespec.errors import InvalidArgument, SparseSpecError
from sparsespec.redis_server import REDIS_URL_ENV
from sparsespec.rpc.strict import add_servicer
from sparsespec.spec.drafter_host import DrafterHost, DrafterHostConfig
from sparsespec.spec.drafter_memory import available_host_bytes
from sparsespec.tls import ServerTLS, health_only_server, server_tls

log = logging.getLogger("drafter_service")

DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
AUTO_BUDGET_FRACTION = 0.9   # of the device memory free after loading the model (CUDA only)
# Of the host RAM available after loading the model (memory.available_host_bytes). Half, not 0.9:
# the host is shared (a local cluster's verifier loads after the drafter) and a session's prefill
# temporaries are not budgeted.
AUTO_HOST_FRACTION = 0.5
HOST_AUTO, HOST_UNLIMITED = "auto", "unlimited"   # --host-memory-bytes words

# Called with "HOST:PORT" once the server listens; may return a callable run at shutdown
# (e.g. register in a worker registry, then deregister).
OnStarted = Callable[[str], "Callable[[], None] | None"]


@dataclass(frozen=True)
class ServerConfig:
    model: str
    drafter: str = "same"                   # same | layers:N | DIR
    drafter_weights: str = "same"           # same | bf16 | int8 | int4 (sparsespec.models.quant)
    policy: str | None = None              # None: build.default_policy(drafter) (fed for same / layers:N)
    budget: int | None = 256                # KV entries per layer; None = full
    dtype: str = "float32"
    device: str = "cpu"
    max_context: int | None = None          # default: the model's
    host: str = "127.0.0.1"
    port: int = 0
    memory_budget_bytes: int | None = None  # None: 90% of free CUDA memory; on CPU the host budget
    host_memory_bytes: int | str = HOST_AUTO  # bytes, HOST_AUTO or HOST_UNLIMITED (host_memory_budget)
    session_ttl_s: float = 600.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    workers: int = 8
    tls: ServerTLS | None = None            # serve over TLS; with tls.client_ca, verifiers need a certificate
    health_port: int | None = None          # plaintext grpc.health.v1 alone (probes without TLS)
    metrics_port: int | None = None         # Prometheus /metrics over plain HTTP (0: a free port); None: off

    def __post_init__(self):
        for name in ("max_message_bytes", "workers"):
            if getattr(self, name) < 1:
                raise InvalidArgument(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("port", "health_port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise InvalidArgument(name.replace("_", "-"), f"must be in [0, 65535], got {value}")
        if self.max_context is not None and self.max_context < 1:
            raise InvalidArgument("max_context", f"must be >= 1, got {self.max_context}")
        hm = self.host_memory_bytes
        if hm not in (HOST_AUTO, HOST_UNLIMITED) and (isinstance(hm, bool) or not isinstance(hm, int) or hm < 1):
            raise InvalidArgument("host_memory_bytes", f"must be a byte count >= 1, {HOST_AUTO!r} or "
                                                       f"{HOST_UNLIMITED!r}, got {hm!r}")
        self.engine_config().sparse_config()   # validates drafter flags before anything loads
        parse_dtype(self.dtype)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(model=self.model, drafter=self.drafter, policy=self.policy, budget=self.budget,
                            dtype=self.dtype, device=self.device, max_context=self.max_context,
                            drafter_weights=self.drafter_weights)


class DrafterServer:
    """A started gRPC server around one drafter host; `stop` is graceful."""

    def __init__(self, drafter_host: DrafterHost, host: str = "127.0.0.1", port: int = 0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, workers: int = 8,
                 tls: ServerTLS | None = None, health_port: int | None = None):
        self.drafter_host = drafter_host
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="drafter"),
                                options=options)
        add_servicer(DrafterServicer(drafter_host), SERVICE, self.grpc)   # undecodable requests: INVALID_ARGUMENT
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        try:
            self.port = (self.grpc.add_secure_port(f"{host}:{port}", tls.credentials()) if tls is not None
                         else self.grpc.add_insecure_port(f"{host}:{port}"))
        except RuntimeError as e:
            raise InvalidArgument("port", f"cannot listen on {host}:{port}: {e}") from None
        if self.port == 0:
            raise InvalidArgument("port", f"cannot listen on {host}:{port}")
        self.address = f"{host}:{self.port}"
        self.health_server = None
        if health_port is not None:
            self.health_server, self.health_port = health_only_server(self.health, host, health_port)
        self._stopping = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="drafter-ttl", daemon=True)
        self.on_stop: list[Callable[[], None]] = []

    def start(self) -> "DrafterServer":
        self.grpc.start()
        if self.health_server is not None:
            self.health_server.start()
        self._reaper.start()
        for name in ("", SERVICE):   # the model is loaded: the host exists
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self

    def _reap(self) -> None:
        """Free the memory of idle sessions even when no new session asks for it."""
        interval = min(5.0, self.drafter_host.config.session_ttl_s / 4)
        while not self._stopping.wait(interval):
            evicted = self.drafter_host.evict_idle()
            if evicted:
                log.info("evicted %d idle sessions", len(evicted))

    def stop(self, grace: float = 5.0) -> None:
        self.health.enter_graceful_shutdown()
        self._stopping.set()
        self.grpc.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0)
        for hook in self.on_stop:
            try:
                hook()
            except Exception:  # noqa: BLE001 - shutting down regardless
                log.exception("shutdown hook failed")


def load_drafter_model(cfg: ServerConfig):
    """The drafter's weights only: `layers:N` loads N layers, a DIR must share the vocabulary;
    then --drafter-weights (bf16, int8, int4) makes its low-memory copy."""
    from sparsespec.models.quant import drafter_weights

    return drafter_weights(_load_drafter_model(cfg), cfg.drafter_weights)


def _load_drafter_model(cfg: ServerConfig):
    from sparsespec.models import load_model, resolve_model
    from sparsespec.models.loader import load_config

    path = resolve_model(cfg.model)
    dtype = parse_dtype(cfg.dtype)
    if cfg.drafter == "same":
        return load_model(path, dtype=dtype, device=cfg.device, max_context=cfg.max_context).eval()
    if cfg.drafter.startswith("layers:"):
        n_text, total = cfg.drafter.split(":", 1)[1], load_config(path).num_layers
        if not n_text.isdigit() or not 1 <= int(n_text) <= total:
            raise InvalidArgument("drafter", f"layers:N needs N in [1, {total}], got {cfg.drafter!r}")
        return load_model(path, dtype=dtype, device=cfg.device, max_context=cfg.max_context,
                          num_layers=int(n_text)).eval()
    verifier_cfg = load_config(path)
    model = load_model(resolve_model(cfg.drafter), dtype=dtype, device=cfg.device,
                       max_context=cfg.max_context or verifier_cfg.max_position_embeddings).eval()
    if model.cfg.vocab_size != verifier_cfg.vocab_size:
        raise InvalidArgument("drafter", f"vocabulary size {model.cfg.vocab_size} differs from the "
                                         f"verifier's {verifier_cfg.vocab_size}: they must share a tokenizer")
    return model


def memory_budget(cfg: ServerConfig, model) -> int | None:
    if cfg.memory_budget_bytes is not None:
        return cfg.memory_budget_bytes
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        return int(free * AUTO_BUDGET_FRACTION)
    return None


def host_memory_budget(cfg: ServerConfig) -> int | None:
    """Host bytes for all sessions; None = unlimited. Auto is measured after the model loaded, so
    its weights are not in the budget; on CPU it bounds the device KV too (it is host RAM)."""
    if cfg.host_memory_bytes == HOST_UNLIMITED:
        return None
    if cfg.host_memory_bytes != HOST_AUTO:
        return cfg.host_memory_bytes
    available = available_host_bytes()
    if available is None:
        raise InvalidArgument("host_memory_bytes", f"{HOST_AUTO!r} cannot read /proc/meminfo here: "
                                                   f"give a byte count or {HOST_UNLIMITED!r}")
    return max(1, int(available * AUTO_HOST_FRACTION))


def serve(cfg: ServerConfig, model=None, on_started: OnStarted | None = None) -> tuple[DrafterServer, int]:
    """Load the model (unless given), start serving. Returns (server, port)."""
    sparse = cfg.engine_config().sparse_config()
    if model is None:
        model = load_drafter_model(cfg)
    drafters = DrafterHost(model, DrafterHostConfig(
        sparse=sparse, max_context=cfg.max_context or model.max_context,
        memory_budget_bytes=memory_budget(cfg, model), session_ttl_s=cfg.session_ttl_s,
        host_memory_budget_bytes=host_memory_budget(cfg)))
    log.info("budgets: device %s, host %s bytes: %s sessions of %s device / %s host bytes",
             drafters.config.memory_budget_bytes, drafters.config.host_memory_budget_bytes,
             drafters.session_capacity, drafters.cost.device_bytes, drafters.cost.host_memory_bytes(model.device))
    server = DrafterServer(drafters, cfg.host, cfg.port, cfg.max_message_bytes, cfg.workers, cfg.tls,
                           cfg.health_port).start()
    from sparsespec import telemetry
    telemetry.watch_drafter(drafters)
    server.metrics_port = telemetry.serve(cfg.host, cfg.metrics_port)
    if on_started is not None:
        try:
            undo = on_started(server.address)
        except BaseException:
            server.stop(grace=0)
            raise
        if undo is not None:
            server.on_stop.append(undo)
    return server, server.port


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m drafter_service", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the verifier's model (a name or a path)")
    p.add_argument("--drafter", default="same", help="same | layers:N | DIR")
    p.add_argument("--drafter-weights", default="same", help="same | bf16 | int8 | int4 (weight-only)")
    p.add_argument("--policy", default=None,
                   help="streaming | chunk_topk | snapkv | verifier_guided | fed | full (default: fed for a "
                        "drafter that shares the verifier's K/V, same or layers:N; chunk_topk otherwise)")
    p.add_argument("--budget", default="256", help="KV entries per layer, or 'full'")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--memory-budget-bytes", type=int, default=None,
                   help="device bytes for all sessions' KV (default: 90%% of free CUDA memory; no limit on CPU, "
                        "where --host-memory-bytes bounds it)")
    p.add_argument("--host-memory-bytes", type=_host_memory_flag, default=HOST_AUTO,
                   help=f"host RAM for all sessions: the host tier, plus the device KV on CPU. {HOST_AUTO!r} "
                        f"(default): {AUTO_HOST_FRACTION:.0%}% of the RAM available once the model is loaded "
                        f"(MemAvailable, capped by the cgroup limit); {HOST_UNLIMITED!r}: no limit")
    p.add_argument("--session-ttl-s", type=float, default=600.0)
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    p.add_argument("--workers", type=int, default=8, help="gRPC handler threads")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--redis", default=os.environ.get(REDIS_URL_ENV),
                   help=f"redis://[:PASSWORD@]HOST:PORT/DB: register in the worker registry (default "
                        f"${REDIS_URL_ENV})")
    p.add_argument("--worker-id", default=None)
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve over TLS")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None,
                   help="require client certificates signed by this CA (mTLS: only verifiers holding one)")
    p.add_argument("--health-port", type=int, default=None,
                   help="also serve grpc.health.v1 alone, in plaintext, on this port (probes without TLS)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics over plain HTTP on this port (0: a free one, printed)")
    return p


def _host_memory_flag(text: str) -> int | str:
    return int(text) if text.isdigit() else text   # ServerConfig says what is wrong with it


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("SPARSESPEC_LOG", "WARNING"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    try:
        cfg = ServerConfig(model=args.model, drafter=args.drafter, drafter_weights=args.drafter_weights,
                           policy=args.policy,
                           budget=parse_budget(args.budget), dtype=args.dtype, device=args.device,
                           max_context=args.max_context, host=args.host, port=args.port,
                           memory_budget_bytes=args.memory_budget_bytes, session_ttl_s=args.session_ttl_s,
                           host_memory_bytes=args.host_memory_bytes,
                           max_message_bytes=args.max_message_bytes, workers=args.workers,
                           tls=server_tls(args.tls_cert, args.tls_key, args.tls_client_ca),
                           health_port=args.health_port, metrics_port=args.metrics_port)
        server, _ = serve(cfg)
        if args.redis:
            from drafter_service.registry import register_worker
            try:
                server.on_stop.append(register_worker(args.redis, server, args.model, args.worker_id))
            except BaseException:
                server.stop(grace=0)
                raise
    except SparseSpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"listening {server.address}", flush=True)
    if server.health_server is not None:
        print(f"health {cfg.host}:{server.health_port}", flush=True)
    if server.metrics_port is not None:
        print(f"metrics http://{cfg.host}:{server.metrics_port}/metrics", flush=True)
    done.wait()
    server.stop()
    return 0
