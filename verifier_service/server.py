"""`python -m verifier_service`: the verifier as a gRPC server.

Loads the model, connects to Redis (sessions, commit log, leases, worker registry), finds
drafters (fixed addresses or the registry), and serves the public Generation API plus
grpc.health.v1. SIGTERM drains: new requests are refused with UNAVAILABLE while running turns
finish (up to --drain-s); clients of turns still unfinished then resume elsewhere.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvstore.cache.summary import SummaryConfig
from sparsespec.auth import ApiKeyInterceptor, ApiKeys, load_api_keys
from sparsespec.spec.summaries import ScheduleConfig
from sparsespec.errors import InvalidArgument, SparseSpecError
from sparsespec.redis_server import REDIS_URL_ENV
from sparsespec.rpc.strict import add_servicer
from sparsespec.tls import ClientTLS, ServerTLS, client_tls, health_only_server, server_tls

log = logging.getLogger("verifier_service")

SERVICE = "sparsespec.v1.Generation"
EXIT_CRASHED = 3        # the round scheduler died: a supervisor restarts the process


@dataclass(frozen=True)
class VerifierConfig:
    model: str
    redis_url: str
    drafters: tuple[str, ...] = ()     # fixed drafter addresses; empty = the Redis registry
    host: str = "127.0.0.1"
    port: int = 0
    dtype: str = "float32"
    device: str = "cpu"                # where the verifier model and its full KV live (cuda, cuda:1)
    max_context: int | None = None
    max_batch: int = 8
    cohorts: int = 1                   # 2: overlapped rounds, the drafter drafts one cohort while the other verifies
    max_queue: int = 64
    default_k: int = 4
    draft_timeout_s: float = 5.0
    lease_ms: int = 3000
    max_message_bytes: int = 4 << 20     # a 128K-token prompt is < 1 MiB; larger is a mistake
    drain_s: float = 30.0
    worker_id: str = field(default_factory=lambda: f"verifier-{uuid.uuid4().hex[:8]}")
    summaries: SummaryConfig = field(default_factory=SummaryConfig)   # KV summaries to drafters
    summary_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)   # and when they go
    api_keys: ApiKeys | None = None    # the Generation API's keys (sparsespec.auth); None: open
    tls: ServerTLS | None = None       # the Generation API over TLS; None: plaintext
    drafter_tls: ClientTLS | None = None   # TLS (and a client certificate for mTLS) to drafters
    health_port: int | None = None     # plaintext grpc.health.v1 alone, for probes without TLS
    metrics_port: int | None = None    # Prometheus /metrics over plain HTTP (0: a free port); None: off

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "default_k", "lease_ms", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise InvalidArgument(name, f"must be >= 1, got {getattr(self, name)}")
        from sparsespec.spec.loop import COHORTS   # torch: only once a verifier is configured
        if self.cohorts not in COHORTS:
            raise InvalidArgument("cohorts", f"must be one of {COHORTS}, got {self.cohorts}")
        if not self.redis_url:
            raise InvalidArgument("redis", f"the verifier needs Redis (sessions and the commit log): "
                                           f"--redis URL or ${REDIS_URL_ENV}")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise InvalidArgument("health-port", f"must be in [0, 65535], got {self.health_port}")


class VerifierServer:
    def __init__(self, cfg: VerifierConfig):
        from kvstore.coord.registry import WorkerRegistry
        from kvstore.coord.sessions import SessionStore
        from sparsespec.build import EngineConfig, load_verifier
        from sparsespec.rpc.drafter_client import GrpcDrafterClient
        from sparsespec.spec.loop import SpecEngine
        from verifier_service.durable import DurableSessions
        from verifier_service.routing import RegistryDirectory, RoutingDrafterClient, StaticDirectory
        from verifier_service.scheduler import Scheduler
        from verifier_service.servicer import GenerationServicer

        self.cfg = cfg
        engine_cfg = EngineConfig(model=cfg.model, dtype=cfg.dtype, device=cfg.device,
                                  max_context=cfg.max_context, max_batch=cfg.max_batch)
        model, tokenizer = load_verifier(engine_cfg)
        self.store = SessionStore(cfg.redis_url)
        self.registry = WorkerRegistry(cfg.redis_url)
        directory = (StaticDirectory(list(cfg.drafters)) if cfg.drafters
                     else RegistryDirectory(self.registry, None))
        drafters = RoutingDrafterClient(
            directory, lambda a: GrpcDrafterClient(a, timeout_s=cfg.draft_timeout_s,
                                                   max_message_bytes=cfg.max_message_bytes, tls=cfg.drafter_tls))
        eos = set(model.cfg.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        engine = SpecEngine(model, drafters, tokenizer, cfg.max_context, cfg.max_batch, sorted(eos),
                            summary=cfg.summaries, schedule=cfg.summary_schedule, cohorts=cfg.cohorts)
        self.sessions = DurableSessions(self.store, cfg.worker_id, cfg.lease_ms)
        self.scheduler = Scheduler(engine, self.sessions, cfg.max_queue)
        from sparsespec import telemetry
        telemetry.watch_verifier(self.scheduler, engine.verifier.cache.row_bytes)
        self.metrics_port = telemetry.serve(cfg.host, cfg.metrics_port)
        info = dict(model=str(cfg.model), vocab_size=model.cfg.vocab_size, max_context=engine.max_context,
                    num_layers=model.cfg.num_layers, dtype=str(model.dtype).removeprefix("torch."))
        self.servicer = GenerationServicer(self.scheduler, self.sessions, tokenizer, info, cfg.default_k,
                                           cfg.api_keys)
        self.health = health.HealthServicer()
        opts = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes)]
        interceptors = [ApiKeyInterceptor(cfg.api_keys)] if cfg.api_keys is not None else []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4 * cfg.max_queue), options=opts,
                                  interceptors=interceptors)
        add_servicer(self.servicer, SERVICE, self.server)   # undecodable requests: INVALID_ARGUMENT
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        where = f"{cfg.host}:{cfg.port}"
        self.port = (self.server.add_secure_port(where, cfg.tls.credentials()) if cfg.tls is not None
                     else self.server.add_insecure_port(where))
        if self.port == 0:
            raise SparseSpecError(f"port: cannot listen on {cfg.host}:{cfg.port}")
        self.address = f"{cfg.host}:{self.port}"
        self.health_server = None
        if cfg.health_port is not None:
            self.health_server, self.health_port = health_only_server(self.health, cfg.host, cfg.health_port)
        self._stopping = threading.Event()
        self._watch = threading.Thread(target=self._watch_health, name="health", daemon=True)

    def start(self, scheduler_thread: bool = True) -> "VerifierServer":
        """Serve. With scheduler_thread=False the caller runs `scheduler.run` itself (main)."""
        from kvstore.coord.registry import Heartbeat, WorkerInfo
        if scheduler_thread:
            self.scheduler.start()
        self._check_health()        # a probe right after `listening` gets an answer, not NOT_FOUND
        self.server.start()
        if self.health_server is not None:
            self.health_server.start()
        self._watch.start()
        info = WorkerInfo(self.cfg.worker_id, "verifier", self.address, str(self.cfg.model), self.cfg.max_batch)
        self.heartbeat = Heartbeat(self.registry, info, load=self.scheduler.load).start()
        return self

    def _check_health(self) -> None:
        """SERVING only while the data path works: the round scheduler runs and Redis answers
        (a verifier that cannot commit must not take work)."""
        try:
            if self.scheduler.crashed is not None:
                raise SparseSpecError(f"round scheduler died: {self.scheduler.crashed!r}")
            self.store.ping()
            status = health_pb2.HealthCheckResponse.SERVING
        except SparseSpecError as e:
            log.warning("%s", e)
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        if not self.servicer.draining:
            self._set_health(status)

    def _set_health(self, status) -> None:
        for name in ("", SERVICE):
            self.health.set(name, status)

    def _watch_health(self) -> None:
        while not self._stopping.wait(0.5):
            self._check_health()

    def begin_drain(self) -> float:
        """Refuse new work from now on; returns the deadline for running turns."""
        self.servicer.draining = True
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        return time.monotonic() + self.cfg.drain_s

    def drain_and_stop(self) -> None:
        """Refuse new work, let running turns finish (bounded), then stop (threaded scheduler)."""
        deadline = self.begin_drain()
        while not self.scheduler.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stop()

    def die(self, error: BaseException) -> int:
        """The round loop died: stop serving at once (health NOT_SERVING, every turn's stream
        fails so the SDK resumes it on another verifier) and return the exit code. The scheduler
        failed its turns already (Scheduler.run)."""
        log.critical("round scheduler died", exc_info=error)
        self._stopping.set()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.stop()
        print(f"error: round scheduler died: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return EXIT_CRASHED

    def stop(self) -> None:
        self._stopping.set()
        self.heartbeat.stop()
        self.server.stop(grace=1.0).wait()
        if self.health_server is not None:
            self.health_server.stop(grace=0)
        self.scheduler.stop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m verifier_service", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--redis", default=os.environ.get(REDIS_URL_ENV),
                   help=f"redis://[:PASSWORD@]HOST:PORT/DB (default ${REDIS_URL_ENV}, which keeps a password "
                        "out of the process list)")
    p.add_argument("--drafter-address", action="append", default=[],
                   help="HOST:PORT of a drafter (repeatable); default: drafters from the Redis registry")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--max-batch", type=int, default=8, help="cache rows: sessions verified together")
    p.add_argument("--cohorts", type=int, default=VerifierConfig.cohorts,
                   help="2: overlap rounds, drafting one half of the sessions while verifying the other")
    p.add_argument("--max-queue", type=int, default=VerifierConfig.max_queue,
                   help="turns queued or running; more are refused with RESOURCE_EXHAUSTED")
    p.add_argument("-k", type=int, default=4, help="default draft length")
    p.add_argument("--lease-ms", type=int, default=3000)
    p.add_argument("--drain-s", type=float, default=30.0)
    p.add_argument("--worker-id", default=None)
    p.add_argument("--summaries", choices=["on", "off"], default="on",
                   help="score attention and send KV summaries to drafters whose policy reads them")
    p.add_argument("--summary-layers", default=None, help="verifier layers scored, comma-separated "
                                                          "(default: 3 evenly spaced)")
    p.add_argument("--summary-groups", type=int, default=None,
                   help="layer groups a summary scores per KV head (default: one per scored layer)")
    add_security_flags(p)
    p.add_argument("--summary-every", type=int, default=ScheduleConfig.every_rounds,
                   help="send at least every R rounds")
    p.add_argument("--summary-alpha", type=float, default=ScheduleConfig.alpha_threshold,
                   help="send early when the windowed alpha drops below this")
    p.add_argument("--summary-growth", type=int, default=ScheduleConfig.growth,
                   help="send when the context grew by this many tokens")
    return p


def add_security_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-keys", default=None, metavar="FILE",
                   help="API keys of the Generation API, one per line (default $SPARSESPEC_API_KEYS; "
                        "neither: no keys); a session belongs to the key that created it")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve the Generation API over TLS")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, help="also require client certificates signed by this CA")
    p.add_argument("--drafter-tls-ca", default=None, help="TLS to drafters, verified with this CA (PEM)")
    p.add_argument("--drafter-tls-cert", default=None, help="client certificate for drafters that require one")
    p.add_argument("--drafter-tls-key", default=None, help="private key of --drafter-tls-cert")
    p.add_argument("--drafter-tls-server-name", default=None,
                   help="the name drafters' certificates carry, when it is not the address dialled")
    p.add_argument("--health-port", type=int, default=None,
                   help="also serve grpc.health.v1 alone, in plaintext, on this port (probes without TLS)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics over plain HTTP on this port (0: a free one, printed)")


def security_config(args) -> dict:
    """--api-keys and the TLS flags -> VerifierConfig fields (files read and checked now)."""
    return dict(api_keys=load_api_keys(args.api_keys),
                tls=server_tls(args.tls_cert, args.tls_key, args.tls_client_ca),
                drafter_tls=client_tls(args.drafter_tls_ca, args.drafter_tls_cert, args.drafter_tls_key,
                                       args.drafter_tls_server_name, prefix="drafter-tls"),
                health_port=args.health_port)


def summary_config(args) -> tuple[SummaryConfig, ScheduleConfig]:
    """What the verifier scores and sends (--summaries, --summary-layers, --summary-groups) and
    when (the rest)."""
    layers = None
    if args.summary_layers:
        try:
            layers = tuple(int(x) for x in args.summary_layers.split(","))
        except ValueError:
            raise InvalidArgument("summary.layers", f"expected comma-separated integers, got "
                                                    f"{args.summary_layers!r}") from None
    return (SummaryConfig(enabled=args.summaries == "on", layers=layers, groups=args.summary_groups),
            ScheduleConfig(every_rounds=args.summary_every, alpha_threshold=args.summary_alpha,
                           growth=args.summary_growth))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("SPARSESPEC_LOG", "WARNING"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        extra = {"worker_id": args.worker_id} if args.worker_id else {}
        summaries, schedule = summary_config(args)
        cfg = VerifierConfig(model=args.model, redis_url=args.redis or "", drafters=tuple(args.drafter_address),
                             host=args.host, port=args.port, dtype=args.dtype, device=args.device,
                             max_context=args.max_context,
                             max_batch=args.max_batch, cohorts=args.cohorts, max_queue=args.max_queue,
                             default_k=args.k,
                             lease_ms=args.lease_ms,
                             drain_s=args.drain_s, summaries=summaries, summary_schedule=schedule,
                             metrics_port=args.metrics_port, **security_config(args), **extra)
        server = VerifierServer(cfg).start(scheduler_thread=False)
    except SparseSpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"listening {server.address}", flush=True)
    if server.health_server is not None:
        print(f"health {cfg.host}:{server.health_port}", flush=True)
    if server.metrics_port is not None:
        print(f"metrics http://{cfg.host}:{server.metrics_port}/metrics", flush=True)
    scheduler = server.scheduler
    try:
        scheduler.run(until=done.is_set)                 # rounds run on the main thread
    except BaseException as e:  # noqa: BLE001 - a dead round loop is a dead service: say so, exit
        return server.die(e)
    log.info("draining")
    deadline = server.begin_drain()
    scheduler.run(until=lambda: scheduler.idle() or time.monotonic() > deadline)
    server.stop()
    print("stopped", flush=True)
    return 0
