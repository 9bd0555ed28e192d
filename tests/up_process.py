"""A real `sparsespec up` for the tests that need one: started, read until `ready`, stopped by SIGINT."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field


@dataclass
class UpProcess:
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)          # every line it printed (kept draining)
    first: dict[str, list[str]] = field(default_factory=dict)   # first word -> the rest of its first line

    def word(self, name: str, i: int = 0) -> str:
        return self.first[name][i]


@contextlib.contextmanager
def running_up(*args, unset: tuple[str, ...] = ()):
    """`python -m sparsespec up ARGS` (without the environment variables in `unset`); yields once
    it printed `ready`, then stops it (exit 0)."""
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.Popen([sys.executable, "-m", "sparsespec", "up", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    up = UpProcess(proc)
    try:
        for line in proc.stdout:
            up.lines.append(line.rstrip("\n"))
            name, _, rest = line.partition(" ")
            up.first.setdefault(name, rest.split())
            if name == "ready":
                break
        assert "ready" in up.first, "\n".join(up.lines)
        threading.Thread(target=lambda: [up.lines.append(x.rstrip("\n")) for x in proc.stdout], daemon=True).start()
        yield up
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
