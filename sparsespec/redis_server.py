"""A redis-server subprocess on a free loopback port, keeping its data in an append-only file.

`sparsespec up` runs one for the local cluster; the tests run theirs. It can be stopped and
started again on the same port and data dir, which is how tests show that a client gets
RedisUnavailable while Redis is down and works again once it is back, and that a restarted Redis
still has every committed token (docs/deploy.md, "Durability").

With a password (`sparsespec up` generates one), Redis refuses every command before AUTH, so a
local process cannot rewrite a session's log behind the verifier's back. The password is in a
0600 config file Redis reads (never in a command line, which any local user can list) and in
`url`, which services get through the environment ($SPARSESPEC_REDIS_URL), not their argv.
"""

from __future__ import annotations

import os
import re
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


REDIS_URL_ENV = "SPARSESPEC_REDIS_URL"   # a Redis URL with its password, kept out of argv and files
PASSWORD_FILE = "password"               # in the data dir, mode 0600: for people joining a local cluster


def redact(url: str) -> str:
    """A Redis URL fit for a log line: `redis://:***@HOST:PORT/DB`."""
    return re.sub(r"^(\w+://)[^@/]*@", r"\1:***@", url)


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
                 dir: str | None = None, password: str | None = None):
        if password is not None and not re.fullmatch(r"[A-Za-z0-9_-]{16,}", password):
            raise InvalidArgument("redis-password", "must be 16 or more of A-Z a-z 0-9 _ - (it goes in a URL)")
        self.password = password
        self.executable = executable
        self.port = port or free_port()
        self.persistence = check_persistence(persistence)
        self._owns_dir = dir is None
        self.dir = tempfile.mkdtemp(prefix="sparsespec-redis-") if dir is None else os.path.abspath(dir)
        os.makedirs(self.dir, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """What clients connect with (the password included: keep it out of logs and argv)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def public_url(self) -> str:
        """The URL without the password, for logs."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def password_file(self) -> str:
        return os.path.join(self.dir, PASSWORD_FILE) if self.password else ""

    def _write_secrets(self) -> list[str]:
        """The 0600 config file holding `requirepass` (redis-server's first argument), and the
        password file; [] without a password."""
        if not self.password:
            return []
        conf = os.path.join(self.dir, "redis.conf")
        for path, text in ((conf, f"requirepass {self.password}\n"), (self.password_file, self.password + "\n")):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(path, 0o600)
        return [conf]

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
            [self.executable, *self._write_secrets(), "--port", str(self.port), "--bind", "127.0.0.1",
             *PERSISTENCE[self.persistence],
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
                auth = f"AUTH {self.password}\r\n".encode() if self.password else b""
                s.sendall(auth + b"PING\r\n")
                f = s.makefile("rb")
                if auth and not f.readline().startswith(b"+OK"):
                    return False
                return f.readline().startswith(b"+PONG")
        except OSError:
            return False
