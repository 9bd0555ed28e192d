"""The Ray actor behind one replica of a pool: it holds the pool's resources and runs the service.

Ray places the actor by the pool's resource shape (GPU type, custom resources) and sets
CUDA_VISIBLE_DEVICES for it; the service child inherits that. The service binds the node's IP,
so the address it registers in Redis is reachable from the other nodes. The actor is sync with
one thread: every method runs on the worker's main thread, which is the thread PR_SET_PDEATHSIG
watches (sparsespec/deploy/process.py).
"""

from __future__ import annotations


class ServiceReplica:
    def __init__(self, role: str, flags: list[str], start_timeout_s: float, env: dict[str, str] | None = None):
        self.role, self.flags, self.start_timeout_s, self.env = role, list(flags), start_timeout_s, env or {}
        self.proc = None

    def start(self) -> str:
        """Start the service on this node's IP and return its HOST:PORT (a gateway's URL) once it listens."""
        import ray

        from sparsespec.deploy.process import ServiceProcess

        host = ray.util.get_node_ip_address()
        self.proc = ServiceProcess(self.role, self.flags + ["--host", host], self.env)
        return self.proc.wait_listening(self.start_timeout_s)

    def poll(self) -> dict:
        """Whether the service still runs; its exit code and last lines when it does not."""
        if self.proc is None:
            return {"alive": False, "exit": None, "output": []}
        alive = self.proc.alive()
        return {"alive": alive, "exit": self.proc.popen.poll(), "address": self.proc.address,
                "output": [] if alive else self.proc.output[-12:]}

    def stop(self, timeout_s: float) -> int | None:
        """Graceful: SIGTERM (drain), SIGKILL after timeout_s. The controller kills the actor after."""
        return None if self.proc is None else self.proc.stop(timeout_s)
