"""A redis-server subprocess on a free loopback port, keeping its data in an append-only file.

`sparsespec up` runs one for the local cluster; the tests run theirs. It can be stopped and
started again on the same port and data dir, which is how tests show that a client gets
RedisUnavailable while Redis is down and works again once it is back, and that a restarted Redis
still has every committed token (docs/deploy.md, "Durability").
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from sparsespec.errors import InvalidArgument

# What a restart of redis-server keeps, and the flags that say so. `everysec` (the default) and
# `always` write each command to the append-only file before Redis replies (a killed Redis loses
# nothing) and fsync it once a second or before every reply (a machine crash loses about the
# last second, or nothing). `none` keeps nothing: a restart comes back empty. No RDB snapshots:
# the AOF is the copy that matters. The Helm chart's bundled Redis (deploy/helm/sparsespec/
# templates/redis.yaml) runs the same flags; docs/deploy.md, "Durability", says what is lost when.
PERSISTENCE = {
    "everysec": ("--appendonly", "yes", "--appendfsync", "everysec", "--save", ""),
    "always": ("--appendonly", "yes", "--appendfsync", "always", "--save", ""),
    "none": ("--appendonly", "no", "--save", ""),
}


def check_persistence(mode: str, field: str = "persistence") -> str:
    if mode not in PERSISTENCE:
        raise InvalidArgument(field, f"must be one of {', '.join(PERSISTENCE)}, got {mode!r}")
    return mode


def find_redis_server() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """`dir`: where the data lives; a temp dir (removed by close()) unless given, and a given
    dir is left in place, so the next server on it starts with its data."""

    def __init__(self, executable: str, port: int | None = None, persistence: str = "everysec",
                 dir: str | None = None):
        self.executable = executable
        self.port = port or free_port()
        self.persistence = check_persistence(persistence)
        self._owns_dir = dir is None
        self.dir = tempfile.mkdtemp(prefix="sparsespec-redis-") if dir is None else os.path.abspath(dir)
        os.makedirs(self.dir, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start on self.port and self.dir (loading what is there) and return once it answers PING."""
        if self.running:
            return
        log = open(os.path.join(self.dir, "redis.log"), "ab")
        self.proc = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", *PERSISTENCE[self.persistence],
             "--dir", self.dir, "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout_s
        while not self._pong():     # a large AOF loads before PING answers PONG (LOADING)
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{self.log_tail()}")
            time.sleep(0.01)

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM (Redis fsyncs its AOF and exits) and wait; SIGKILL if it will not go."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        """Stop; remove the data dir if it is our temp dir."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log"), "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False
