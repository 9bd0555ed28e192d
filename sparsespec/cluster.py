"""A local cluster on 127.0.0.1: redis-server, drafters and verifiers, each its own process.

Used by `sparsespec up`, by the demo and by the service tests, so the thing we test is the thing
users start. Every process is started with a pipe on stdout; a service prints
`listening HOST:PORT` once it serves, and the cluster waits for that line (and for Redis to
answer PING) before it reports ready. `supervise()` (what `sparsespec up` runs) restarts a child
that exits, on the same port, and gives up on one that keeps crashing.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from sparsespec.errors import InvalidArgument, SparseSpecError
from sparsespec.redis_server import REDIS_URL_ENV, RedisServer, check_persistence, find_redis_server


class ClusterError(SparseSpecError):
    """A process of the local cluster failed to start; the message carries its last output."""


@dataclass
class Proc:
    """A service process with its recent output; `address` once it printed `listening HOST:PORT`.
    It keeps the command it runs, so it can be run again (`respawn`)."""
    name: str
    popen: subprocess.Popen
    module: str = ""
    args: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    started: float = field(default_factory=time.monotonic)
    address: str = ""
    metrics_url: str = ""                  # its Prometheus /metrics, once it printed `metrics URL`
    output: list[str] = field(default_factory=list)
    _listening: threading.Event = field(default_factory=threading.Event, repr=False)
    _pump: threading.Thread | None = field(default=None, repr=False)

    def _read_output(self) -> None:
        for line in self.popen.stdout:
            line = line.rstrip("\n")
            self.output.append(line)
            del self.output[:-200]
            if line.startswith("metrics ") and not self.metrics_url:     # printed right after `listening`
                self.metrics_url = line.split()[1]
            if line.startswith("listening ") and not self._listening.is_set():
                self.address = line.split()[1]
                self._listening.set()
        self._listening.set()    # EOF: the process is gone

    def wait_metrics(self, timeout: float = 10.0) -> str:
        """Its /metrics URL (the line follows `listening`); "" if it prints none in time."""
        deadline = time.monotonic() + timeout
        while not self.metrics_url and self.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.metrics_url

    def wait_listening(self, timeout: float) -> bool:
        """True once it listens; False if it exited or stayed silent for `timeout` seconds."""
        return self._listening.wait(timeout) and bool(self.address)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: the failure tests' crash. Returns once its last output has been read."""
        if self.alive():
            self.popen.kill()
        self.popen.wait()
        if self._pump is not None:
            self._pump.join(5.0)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the drafter deregisters, the verifier drains its turns), SIGKILL after timeout."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.wait()

    def respawn(self) -> "Proc":
        """The same service again, on the port this one served on, so clients keep its address
        (both services take --port). One that never listened had its port pinned already."""
        args = list(self.args)
        if self.address:
            if "--port" in args:
                i = args.index("--port")
                del args[i:i + 2]
            args += ["--port", self.address.rsplit(":", 1)[1]]
        return spawn_service(self.name, self.module, args, self.env)


def spawn_service(name: str, module: str, args: list, env: dict[str, str] | None = None,
                  preexec_fn=None) -> Proc:
    """Run `python -m module args...` with its output read in the background (not waited for)."""
    # One malloc arena: torch on worker threads is ~15% slower otherwise (sparsespec/runtime.py).
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    child_env.setdefault("MALLOC_ARENA_MAX", "1")
    # Services that share cores (a local cluster: the drafter and the verifier take turns) must not
    # spin-wait in OpenMP after each op: a spinning idle process took the cores the busy one
    # needed (a 514-token turn: 8.5 s active, 1.5 s passive); alone on its cores it costs nothing.
    child_env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    popen = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, env=child_env,
                             preexec_fn=preexec_fn)
    proc = Proc(name, popen, module, [str(a) for a in args], env)
    proc._pump = threading.Thread(target=proc._read_output, name=f"{name}-output", daemon=True)
    proc._pump.start()
    return proc


def start_service(name: str, module: str, args: list[str], timeout: float = 300.0,
                  env: dict[str, str] | None = None) -> Proc:
    """Run `python -m module args...`, wait for its `listening HOST:PORT` line."""
    proc = spawn_service(name, module, args, env)
    if not proc.wait_listening(timeout):
        proc.kill()
        tail = "\n".join(proc.output[-15:])
        raise ClusterError(f"{name}: did not start (exit {proc.popen.poll()}):\n{tail}")
    return proc


@dataclass
class ClusterConfig:
    model: str
    drafter: str = "same"
    drafter_weights: str = "same"         # same | bf16 | int8 | int4: the drafter's weights only
    policy: str | None = None             # None: the drafter service's default (build.default_policy)
    budget: str = "256"
    dtype: str = "float32"
    max_context: int | None = None
    max_batch: int = 8
    cohorts: int = 1                      # the verifier's --cohorts (2: overlapped rounds)
    k: int = 4
    lease_ms: int = 3000
    redis_persistence: str = "everysec"   # sparsespec.redis_server.PERSISTENCE
    redis_dir: str | None = None          # None: a temp dir, removed when the cluster stops
    http_port: int | None = None          # the OpenAI HTTP gateway's port (0: pick one); None: no gateway
    api_keys: str | None = None           # keys file of the verifier's gRPC API and the gateway (--api-keys)
    tls_cert: str | None = None           # one certificate (and key) for every service: the public API, the
    tls_key: str | None = None            #   gateway's HTTPS, the drafter, and the verifier's client certificate with mtls
    tls_ca: str | None = None             # the CA that signed it: how the verifier and the gateway check peers
    mtls: bool = False                    # the drafter requires the verifier's client certificate

    def __post_init__(self):
        check_persistence(self.redis_persistence, "redis-persistence")
        from sparsespec.spec.loop import COHORTS        # torch: only once a cluster is configured
        if self.cohorts not in COHORTS:
            raise InvalidArgument("cohorts", f"must be one of {COHORTS}, got {self.cohorts}")
        from sparsespec.auth import load_api_keys
        from sparsespec.tls import client_tls, server_ssl_context
        load_api_keys(self.api_keys)                         # a bad file: one line now, before anything starts
        # both or neither, readable PEM, the key the certificate's: one line now, before anything starts
        if server_ssl_context(self.tls_cert, self.tls_key) is not None or self.tls_ca:
            if not self.tls_ca:
                raise InvalidArgument("tls-ca", "is required with --tls-cert (the verifier and the gateway "
                                                "check the services' certificate with it)")
            client_tls(self.tls_ca)
            if not self.tls_cert:
                raise InvalidArgument("tls-cert", "is required with --tls-ca")
        if self.mtls and not self.tls_cert:
            raise InvalidArgument("mtls", "needs --tls-cert, --tls-key and --tls-ca")
        from sparsespec.models.quant import check_drafter_weights   # torch: only once a cluster is configured
        check_drafter_weights(self.drafter_weights)


@dataclass(frozen=True)
class RestartPolicy:
    """When `supervise()` restarts an exited child and when it gives up.

    The `max_crashes`-th exit in a row stops the cluster: a child that crashes that often will
    not start working by itself, and a cluster without it only fails requests. A child that ran
    `stable_s` before it exited starts a new count (it crashed once; it is not crash-looping)."""
    max_crashes: int = 3
    stable_s: float = 60.0
    start_timeout_s: float = 300.0      # a restarted service that does not listen by then crashed
    poll_s: float = 0.2

    def __post_init__(self):
        if self.max_crashes < 1:
            raise InvalidArgument("max-crashes", f"must be >= 1, got {self.max_crashes}")
        for name in ("stable_s", "start_timeout_s", "poll_s"):
            if not getattr(self, name) > 0:
                raise InvalidArgument(name, f"must be > 0, got {getattr(self, name)}")


def _stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _exited(code: int) -> str:
    """`exited with code -9 (SIGKILL)`: Popen's negative codes are signals."""
    if code < 0:
        try:
            return f"exited with code {code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return f"exited with code {code}"


class LocalCluster:
    """Redis + one drafter + one verifier (more can be added), and the HTTP gateway when
    cfg.http_port is set, stopped together.

    Pass `redis_url` to use a Redis someone else runs (the tests stop and restart theirs); the
    cluster's own Redis gets a generated password. Services get the Redis URL (password included)
    in their environment ($SPARSESPEC_REDIS_URL), never on their command line."""

    def __init__(self, cfg: ClusterConfig, redis_url: str | None = None):
        self.cfg = cfg
        self.redis: RedisServer | None = None
        self.redis_url = redis_url or ""
        self.drafters: list[Proc] = []
        self.verifiers: list[Proc] = []
        self.gateways: list[Proc] = []        # sparsespec.gateway: HTTP in front of the verifiers
        # stop() sets _stopping under _lock, so supervise() never restarts a child being stopped.
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._redis_started = 0.0

    def start(self) -> "LocalCluster":
        try:
            if not self.redis_url:
                exe = find_redis_server()
                if exe is None:
                    raise ClusterError("redis: redis-server is not on PATH (apt-get install redis-server)")
                self.redis = RedisServer(exe, persistence=self.cfg.redis_persistence, dir=self.cfg.redis_dir,
                                         password=secrets.token_urlsafe(24))
                self.redis.start()
                self._redis_started = time.monotonic()
                self.redis_url = self.redis.url
            self.add_drafter()
            self.add_verifier()
            if self.cfg.http_port is not None:
                self.add_gateway()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def address(self) -> str:
        return self.verifiers[0].address

    @property
    def url(self) -> str:
        """The HTTP gateway's `http://HOST:PORT` (`https://` with TLS; "" without a gateway)."""
        return self.gateways[0].address if self.gateways else ""

    def _common(self) -> list:
        args = ["--model", self.cfg.model, "--dtype", self.cfg.dtype]
        if self.cfg.max_context:
            args += ["--max-context", self.cfg.max_context]
        return args

    @property
    def _env(self) -> dict[str, str]:
        return {REDIS_URL_ENV: self.redis_url}

    def _keys(self) -> list:
        return ["--api-keys", self.cfg.api_keys] if self.cfg.api_keys else []

    def add_drafter(self) -> Proc:
        c = self.cfg
        args = self._common() + ["--drafter", c.drafter, "--drafter-weights", c.drafter_weights,
                                 *(["--policy", c.policy] if c.policy else []),
                                 "--budget", c.budget, "--metrics-port", 0]
        if c.tls_cert:
            args += ["--tls-cert", c.tls_cert, "--tls-key", c.tls_key] + (["--tls-client-ca", c.tls_ca] if c.mtls else [])
        proc = start_service(f"drafter{len(self.drafters)}", "drafter_service", args, env=self._env)
        self.drafters.append(proc)
        return proc

    def add_verifier(self) -> Proc:
        c = self.cfg
        args = self._common() + ["--max-batch", c.max_batch, "--cohorts", c.cohorts, "-k", c.k, "--lease-ms", c.lease_ms,
                                 "--metrics-port", 0] + self._keys()
        if c.tls_cert:
            args += ["--tls-cert", c.tls_cert, "--tls-key", c.tls_key, "--drafter-tls-ca", c.tls_ca]
            if c.mtls:
                args += ["--drafter-tls-cert", c.tls_cert, "--drafter-tls-key", c.tls_key]
        proc = start_service(f"verifier{len(self.verifiers)}", "verifier_service", args, env=self._env)
        self.verifiers.append(proc)
        return proc

    def add_gateway(self) -> Proc:
        """The OpenAI HTTP gateway; it finds the verifiers in the Redis registry. With TLS it
        serves HTTPS with the same certificate as the verifier's gRPC API."""
        c = self.cfg
        args = ["--model", c.model, "--port", c.http_port or 0, "-k", c.k] + self._keys()
        if c.tls_cert:
            args += ["--verifier-tls-ca", c.tls_ca, "--tls-cert", c.tls_cert, "--tls-key", c.tls_key]
        proc = start_service(f"gateway{len(self.gateways)}", "sparsespec.gateway", args, env=self._env)
        self.gateways.append(proc)
        return proc

    def _children(self) -> list[Proc]:
        return self.drafters + self.verifiers + self.gateways

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            procs = self.gateways + self.verifiers + self.drafters
        for proc in procs:
            proc.stop()
        if self.redis is not None:
            self.redis.close()

    # --- supervision -----------------------------------------------------------------------

    def supervise(self, stop: threading.Event, policy: RestartPolicy | None = None,
                  log: Callable[[str], None] = _stderr_line) -> bool:
        """Restart every child that exits until `stop` is set or the cluster stops (True), or
        until one crashed policy.max_crashes times in a row (False: the caller stops the cluster).

        Services come back on their port, Redis on its port and data dir (with its AOF it keeps
        every key). Runs on the caller's thread; one line to `log` per crash, restart and give-up."""
        policy = policy or RestartPolicy()
        crashes: dict[str, int] = {}
        coming_back: set[str] = set()      # restarted services that have not listened yet
        while not stop.wait(policy.poll_s) and not self._stopping.is_set():
            for name, reason, started in self._failed(policy, coming_back):
                if stop.is_set() or self._stopping.is_set():
                    return True
                n = 1 if time.monotonic() - started >= policy.stable_s else crashes.get(name, 0) + 1
                crashes[name] = n
                if n >= policy.max_crashes:
                    log(f"up: {name} {reason}; giving up (crash {n} of {policy.max_crashes}, each within "
                        f"{policy.stable_s:g} s of its start); stopping the cluster")
                    return False
                log(f"up: {name} {reason}; restarting (crash {n} of {policy.max_crashes})")
                if self._restart(name, log):
                    coming_back.add(name)      # logged once it listens (or counted as a crash)
            for proc in self._children():
                if proc.name in coming_back and proc.address:
                    coming_back.discard(proc.name)
                    log(f"up: {proc.name} restarted: {proc.address} pid {proc.popen.pid}")
        return True

    def _failed(self, policy: RestartPolicy, coming_back: set[str]) -> list[tuple[str, str, float]]:
        """(name, what happened, when it started) for every child that is down."""
        failed = []
        if self.redis is not None and not self.redis.running:
            code = self.redis.proc.poll() if self.redis.proc is not None else None
            failed.append(("redis", "did not start" if code is None else _exited(code),
                           self._redis_started))
        for proc in self._children():
            code = proc.popen.poll()
            if code is not None:
                failed.append((proc.name, _exited(code), proc.started))
            elif proc.name in coming_back and time.monotonic() - proc.started > policy.start_timeout_s:
                proc.kill()
                coming_back.discard(proc.name)
                failed.append((proc.name, f"did not listen within {policy.start_timeout_s:g} s", proc.started))
        return failed

    def _restart(self, name: str, log: Callable[[str], None]) -> bool:
        """Start `name` again. True: a service was spawned and is not listening yet (it loads its
        model while the loop keeps watching the others); False: Redis (started, or not), or the
        cluster is stopping. A Redis that fails to start shows up as down on the next poll."""
        with self._lock:
            if self._stopping.is_set():
                return False
            if name == "redis":
                self._redis_started = time.monotonic()
                try:
                    self.redis.start()
                except RuntimeError as e:
                    log(f"up: {e}")
                    return False
                log(f"up: redis restarted: {self.redis.public_url} pid {self.redis.proc.pid}")
                return False
            for procs in (self.drafters, self.verifiers, self.gateways):
                for i, proc in enumerate(procs):
                    if proc.name == name:
                        procs[i] = proc.respawn()
                        return True
        raise KeyError(name)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
