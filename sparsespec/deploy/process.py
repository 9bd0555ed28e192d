"""A service as a child process that cannot outlive its parent.

A Ray actor hosts each replica as `python -m verifier_service|drafter_service` (the verifier's
rounds must run on a process's main thread, and the child is exactly what the container image
runs). The child is started with PR_SET_PDEATHSIG, so when the actor's process dies for any
reason (ray.kill, a node going away, `ray stop`) the kernel sends the service SIGTERM and it
deregisters from Redis and exits: nothing is left behind to hold a GPU or a port.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

from sparsespec.errors import SparseSpecError

PR_SET_PDEATHSIG = 1
MODULES = {"verifier": "verifier_service", "drafter": "drafter_service"}


class ServiceStartError(SparseSpecError):
    """The service exited or stayed silent before it listened; the message carries its output."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:      # the parent died before prctl took effect
            os._exit(1)


class ServiceProcess:
    """One running service: its address once it listens, its recent output, stop and kill."""

    def __init__(self, role: str, flags: list[str], env: dict[str, str] | None = None):
        if role not in MODULES:
            raise SparseSpecError(f"role: must be one of {sorted(MODULES)}, got {role!r}")
        self.role = role
        self.address = ""
        self.output: list[str] = []
        self._listening = threading.Event()
        child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        child_env.setdefault("MALLOC_ARENA_MAX", "1")   # see sparsespec/runtime.py
        self.popen = subprocess.Popen([sys.executable, "-m", MODULES[role], *flags], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                      env=child_env, preexec_fn=_die_with_parent)
        threading.Thread(target=self._pump, name=f"{role}-output", daemon=True).start()

    def _pump(self) -> None:
        for line in self.popen.stdout:
            line = line.rstrip("\n")
            self.output.append(line)
            del self.output[:-200]
            if line.startswith("listening ") and not self._listening.is_set():
                self.address = line.split()[1]
                self._listening.set()
        self._listening.set()    # EOF: the process is gone

    def wait_listening(self, timeout_s: float) -> str:
        """The HOST:PORT it serves on; raises ServiceStartError (and kills it) otherwise."""
        if not self._listening.wait(timeout_s) or not self.address:
            self.kill()
            time.sleep(0.05)    # let the pump read the last lines
            tail = "\n".join(self.output[-12:])
            raise ServiceStartError(f"{self.role} exited with {self.popen.poll()} before it listened "
                                    f"(timeout {timeout_s:g}s):\n{tail}")
        return self.address

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout_s: float) -> int:
        """SIGTERM (the drafter deregisters, the verifier drains its turns), SIGKILL after timeout_s."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.wait()

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
        self.popen.wait()
