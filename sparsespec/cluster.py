"""A local cluster on 127.0.0.1: redis-server, drafters and verifiers, each its own process.

Used by `sparsespec up`, by the demo and by the service tests, so the thing we test is the thing
users start. Every process is started with a pipe on stdout; a service prints
`listening HOST:PORT` once it serves, and the cluster waits for that line (and for Redis to
answer PING) before it reports ready.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field

from sparsespec.errors import SparseSpecError
from sparsespec.redis_server import RedisServer, find_redis_server


class ClusterError(SparseSpecError):
    """A process of the local cluster failed to start; the message carries its last output."""


@dataclass
class Proc:
    """A service process with its recent output; `address` once it printed `listening HOST:PORT`."""
    name: str
    popen: subprocess.Popen
    address: str = ""
    output: list[str] = field(default_factory=list)
    _listening: threading.Event = field(default_factory=threading.Event, repr=False)
    _pump: threading.Thread | None = field(default=None, repr=False)

    def _read_output(self) -> None:
        for line in self.popen.stdout:
            line = line.rstrip("\n")
            self.output.append(line)
            del self.output[:-200]
            if line.startswith("listening ") and not self._listening.is_set():
                self.address = line.split()[1]
                self._listening.set()
        self._listening.set()    # EOF: the process is gone

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


def spawn_service(name: str, module: str, args: list, env: dict[str, str] | None = None,
                  preexec_fn=None) -> Proc:
    """Run `python -m module args...` with its output read in the background (not waited for)."""
    # One malloc arena: torch on worker threads is ~15% slower otherwise (sparsespec/runtime.py).
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    child_env.setdefault("MALLOC_ARENA_MAX", "1")
    popen = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, env=child_env,
                             preexec_fn=preexec_fn)
    proc = Proc(name, popen)
    proc._pump = threading.Thread(target=proc._read_output, name=f"{name}-output", daemon=True)
    proc._pump.start()
    return proc


def start_service(name: str, module: str, args: list[str], timeout: float = 300.0) -> Proc:
    """Run `python -m module args...`, wait for its `listening HOST:PORT` line."""
    proc = spawn_service(name, module, args)
    if not proc.wait_listening(timeout):
        proc.kill()
        tail = "\n".join(proc.output[-15:])
        raise ClusterError(f"{name}: did not start (exit {proc.popen.poll()}):\n{tail}")
    return proc


@dataclass
class ClusterConfig:
    model: str
    drafter: str = "same"
    policy: str = "chunk_topk"
    budget: str = "256"
    dtype: str = "float32"
    max_context: int | None = None
    max_batch: int = 8
    k: int = 4
    lease_ms: int = 3000


class LocalCluster:
    """Redis + one drafter + one verifier (more can be added), stopped together.

    Pass `redis_url` to use a Redis someone else runs (the tests stop and restart theirs)."""

    def __init__(self, cfg: ClusterConfig, redis_url: str | None = None):
        self.cfg = cfg
        self.redis: RedisServer | None = None
        self.redis_url = redis_url or ""
        self.drafters: list[Proc] = []
        self.verifiers: list[Proc] = []

    def start(self) -> "LocalCluster":
        try:
            if not self.redis_url:
                exe = find_redis_server()
                if exe is None:
                    raise ClusterError("redis: redis-server is not on PATH (apt-get install redis-server)")
                self.redis = RedisServer(exe)
                self.redis.start()
                self.redis_url = self.redis.url
            self.add_drafter()
            self.add_verifier()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def address(self) -> str:
        return self.verifiers[0].address

    def _common(self) -> list:
        args = ["--model", self.cfg.model, "--dtype", self.cfg.dtype, "--redis", self.redis_url]
        if self.cfg.max_context:
            args += ["--max-context", self.cfg.max_context]
        return args

    def add_drafter(self) -> Proc:
        args = self._common() + ["--drafter", self.cfg.drafter, "--policy", self.cfg.policy,
                                 "--budget", self.cfg.budget]
        proc = start_service(f"drafter{len(self.drafters)}", "drafter_service", args)
        self.drafters.append(proc)
        return proc

    def add_verifier(self) -> Proc:
        args = self._common() + ["--max-batch", self.cfg.max_batch, "-k", self.cfg.k,
                                 "--lease-ms", self.cfg.lease_ms]
        proc = start_service(f"verifier{len(self.verifiers)}", "verifier_service", args)
        self.verifiers.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.verifiers + self.drafters:
            proc.stop()
        if self.redis is not None:
            self.redis.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
