"""`sparsespec up` supervises its children: the real command as a subprocess, a tiny random model,
children killed with SIGKILL. A dead verifier, drafter or redis-server comes back on its address
(Redis with its data); a child that keeps crashing stops the cluster with a message and exit 1;
SIGTERM stops everything and restarts nothing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from kvstore.coord.sessions import SessionStore
from sparsespec.client import SparseSpecClient
from sparsespec.models.testing import save_random_model, tiny_config
from sparsespec.redis_server import find_redis_server

PROMPT = "In the beginning God created the heaven and the earth. "

pytestmark = pytest.mark.skipif(find_redis_server() is None, reason="redis-server is not installed")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = tiny_config(max_position_embeddings=1024, eos_token_ids=(), num_layers=2)
    return save_random_model(tmp_path_factory.mktemp("sup") / "model", cfg, seed=5)


class Up:
    """A running `sparsespec up` whose output (stdout and stderr) is read in the background. It
    runs in its own process group, so close() can take down whatever it left, pids known or not."""

    def __init__(self, model_dir):
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen([sys.executable, "-m", "sparsespec", "up", "--model", str(model_dir),
                                      "--budget", "16"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, start_new_session=True)
        self.lines: list[str] = []
        self._seen = 0
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.pids: set[int] = set()
        try:
            # `up` prints Redis' URL without its password, and the 0600 file that holds it
            self.public_redis_url, self.redis_pid, secret = self.expect(
                r"^redis (\S+) pid (\d+) password-file (\S+)$").groups()
            with open(secret) as f:
                self.redis_url = self.public_redis_url.replace("redis://", f"redis://:{f.read().strip()}@", 1)
            self.drafter, self.drafter_pid = self.expect(r"^drafter (\S+) pid (\d+)$").groups()
            self.verifier, self.verifier_pid = self.expect(r"^verifier (\S+) pid (\d+)$").groups()
            assert self.expect(r"^ready (\S+)$")[1] == self.verifier
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append(None)     # EOF
            self._cond.notify_all()

    def expect(self, pattern: str, timeout: float = 120.0) -> re.Match:
        """The next line (after the last one matched) that matches; records the pids it names."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._seen < len(self.lines):
                    line = self.lines[self._seen]
                    self._seen += 1
                    assert line is not None, f"up exited before {pattern!r}:\n" + self.output()
                    m = re.match(pattern, line)
                    if m:
                        self.pids.update(int(p) for p in re.findall(r"pid (\d+)", line))
                        return m
                left = deadline - time.monotonic()
                assert left > 0, f"no line {pattern!r} in time:\n" + self.output()
                self._cond.wait(left)

    def output(self) -> str:
        return "\n".join(x for x in self.lines if x is not None)

    def kill_child(self, pid) -> None:
        os.kill(int(pid), signal.SIGKILL)

    def close(self) -> None:
        """Kill whatever is left (a failed test must not leave processes behind)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killed_children_come_back_on_their_address_and_sigterm_stops_all(model_dir):
    up = Up(model_dir)
    try:
        with SparseSpecClient(up.verifier) as client:
            first = client.generate(PROMPT, max_tokens=16)
            committed = SessionStore(up.redis_url).context(first.session_id)

            up.kill_child(up.verifier_pid)
            up.expect(r"^up: verifier0 exited with code -9 \(SIGKILL\); restarting \(crash 1 of 3\)$")
            pid = int(up.expect(rf"^up: verifier0 restarted: {re.escape(up.verifier)} pid (\d+)$")[1])
            assert pid != int(up.verifier_pid) and alive(pid)
            assert client.generate(PROMPT, max_tokens=16).token_ids == first.token_ids   # same address

            up.kill_child(up.redis_pid)                      # its AOF keeps every committed token
            up.expect(r"^up: redis exited with code -9 \(SIGKILL\); restarting \(crash 1 of 3\)$")
            up.expect(rf"^up: redis restarted: {re.escape(up.public_redis_url)} pid \d+$")
            assert SessionStore(up.redis_url).context(first.session_id) == committed
            assert client.generate(PROMPT, max_tokens=16).token_ids == first.token_ids

        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(60) == 0, up.output()
        up.expect(r"^stopping$")
        assert not [x for x in up.lines[up._seen:] if x and "restart" in x]   # none while stopping
        assert [p for p in up.pids if alive(p)] == []
    finally:
        up.close()


def test_a_child_that_keeps_crashing_stops_up_with_exit_1(model_dir):
    up = Up(model_dir)
    try:
        up.kill_child(up.drafter_pid)                        # one drafter crash: restarted, same address
        up.expect(r"^up: drafter0 exited with code -9 \(SIGKILL\); restarting \(crash 1 of 3\)$")
        up.expect(rf"^up: drafter0 restarted: {re.escape(up.drafter)} pid \d+$")

        pid = up.verifier_pid
        for n in (1, 2):
            up.kill_child(pid)
            up.expect(rf"^up: verifier0 exited with code -9 \(SIGKILL\); restarting \(crash {n} of 3\)$")
            pid = up.expect(rf"^up: verifier0 restarted: {re.escape(up.verifier)} pid (\d+)$")[1]
        up.kill_child(pid)
        up.expect(r"^up: verifier0 exited with code -9 \(SIGKILL\); giving up \(crash 3 of 3, each within "
                  r"60 s of its start\); stopping the cluster$")
        assert up.proc.wait(60) == 1, up.output()
        up.expect(r"^stopping$")
        assert len(up.pids) == 6                             # redis, 2 drafters, 3 verifiers
        assert [p for p in up.pids if alive(p)] == []        # no child left behind
    finally:
        up.close()
