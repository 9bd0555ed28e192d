"""A service as a child process that cannot outlive its parent.

A Ray actor hosts each replica as `python -m verifier_service|drafter_service|sparsespec.gateway` (the verifier's
rounds must run on a process's main thread, and the child is exactly what the container image
runs). The child is started with PR_SET_PDEATHSIG, so when the actor's process dies for any
reason (ray.kill, a node going away, `ray stop`) the kernel sends the service SIGTERM and it
deregisters from Redis and exits: nothing is left behind to hold a GPU or a port.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from sparsespec.cluster import spawn_service
from sparsespec.errors import SparseSpecError

PR_SET_PDEATHSIG = 1
MODULES = {"verifier": "verifier_service", "drafter": "drafter_service", "gateway": "sparsespec.gateway"}


class ServiceStartError(SparseSpecError):
    """The service exited or stayed silent before it listened; the message carries its output."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:      # the parent died before prctl took effect
            os._exit(1)


class ServiceProcess:
    """One running service (sparsespec.cluster.Proc) that dies with this process."""

    def __init__(self, role: str, flags: list[str], env: dict[str, str] | None = None):
        if role not in MODULES:
            raise SparseSpecError(f"role: must be one of {sorted(MODULES)}, got {role!r}")
        self.role = role
        self.proc = spawn_service(role, MODULES[role], flags, env, preexec_fn=_die_with_parent)
        self.popen = self.proc.popen

    @property
    def address(self) -> str:
        return self.proc.address

    @property
    def output(self) -> list[str]:
        return self.proc.output

    def wait_listening(self, timeout_s: float) -> str:
        """The HOST:PORT it serves on (a gateway's http(s)://HOST:PORT); raises ServiceStartError
        (and kills it) otherwise."""
        if not self.proc.wait_listening(timeout_s):
            self.proc.kill()                 # returns once its last lines are read
            tail = "\n".join(self.output[-12:])
            raise ServiceStartError(f"{self.role} exited with {self.popen.poll()} before it listened "
                                    f"(timeout {timeout_s:g}s):\n{tail}")
        return self.address

    def alive(self) -> bool:
        return self.proc.alive()

    def stop(self, timeout_s: float) -> int:
        return self.proc.stop(timeout_s)

    def kill(self) -> None:
        self.proc.kill()
