"""Python entry point: bring a deployment up on a Ray cluster, find it again, scale it, take it down.

    from sparsespec.deploy import up, load_config
    dep = up(load_config("deploy/ray/cpu.yaml"), address="auto")   # an existing cluster (`ray start`)
    dep.verifier_addresses()                                       # give these to SparseSpecClient
    dep.gateway_urls()                                             # OpenAI clients: base_url URL + "/v1"
    dep.scale("drafter", 4)
    dep.down()

The pools live in a detached controller actor named `controller` in the Ray namespace
`config.name`, so `up` returns once they serve and any later process (`sparsespec ray status`,
`scale`, `down`) reaches them by name. With address=None, `up` starts a local Ray cluster that
lives as long as the calling process.
"""

from __future__ import annotations

from typing import Any

from sparsespec.deploy.config import DeployConfig
from sparsespec.errors import SparseSpecError

CONTROLLER = "controller"
HEAD_RESOURCE = "node:__internal_head__"    # Ray gives the head node this resource


def _check_reachable(address: str | None) -> None:
    """Fail in seconds when nothing listens where Ray will connect; ray.init itself retries for
    many minutes. Ray rewrites 127.0.0.1 to this node's IP unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
    so the check uses Ray's own rewrite (a private helper: when it is missing, nothing is checked)."""
    import socket

    if address in (None, "local"):
        return
    try:
        from ray._private.services import canonicalize_bootstrap_address
        resolved = canonicalize_bootstrap_address(address)
    except Exception:  # noqa: BLE001 - no cluster found, or the helper moved: ray.init reports it
        return
    if not resolved:
        return
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        hint = (" (Ray connects to this node's IP instead of 127.0.0.1 unless "
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set)" if resolved != address else "")
        raise SparseSpecError(f"address: no Ray cluster answers at {resolved}{hint}: {e}") from None


def init_ray(address: str | None, namespace: str) -> None:
    """Connect this process to Ray (quietly, without the dashboard when it starts a local one)."""
    import ray

    if ray.is_initialized():
        return
    _check_reachable(address)
    opts: dict[str, Any] = {"namespace": namespace, "logging_level": "WARNING", "log_to_driver": False}
    if address is None:
        opts["include_dashboard"] = False
    try:
        ray.init(address=address, **opts)
    except ConnectionError as e:
        raise SparseSpecError(f"address: cannot reach a Ray cluster at {address or 'a new local one'}: {e}; "
                              f"start one with `ray start --head` or pass --address HOST:PORT") from None


def _get(ref, timeout_s: float | None = None):
    """ray.get that re-raises our own errors from inside an actor as themselves (one clean line)."""
    import ray

    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, SparseSpecError):
            raise cause from None
        raise


class Deployment:
    """A handle on a running deployment (its controller actor)."""

    def __init__(self, name: str, controller):
        self.name, self.controller = name, controller

    def status(self) -> dict:
        return _get(self.controller.status.remote(), 60)

    def wait_ready(self, timeout_s: float = 600.0) -> dict:
        return _get(self.controller.wait_ready.remote(timeout_s))

    def addresses(self, role: str) -> list[str]:
        pool = self.status()["pools"].get(role, {"replicas": []})
        return [r["address"] for r in pool["replicas"] if r["state"] == "ready"]

    def verifier_addresses(self) -> list[str]:
        return self.addresses("verifier")

    def gateway_urls(self) -> list[str]:
        """The OpenAI HTTP gateways' `http(s)://HOST:PORT` (their API is under /v1); [] without a gateway pool."""
        return self.addresses("gateway")

    def scale(self, pool: str, replicas: int) -> dict:
        return _get(self.controller.scale.remote(pool, replicas), 60)

    def down(self) -> dict:
        """Stop every replica (gateways first, then verifiers, which drain), then the controller itself."""
        import ray

        try:
            return _get(self.controller.shutdown.remote())
        finally:
            ray.kill(self.controller, no_restart=True)


def up(config: DeployConfig, address: str | None = "auto", timeout_s: float = 600.0) -> Deployment:
    """Start the controller and wait until every pool serves; on failure nothing is left running."""
    import ray

    from sparsespec.deploy.controller import PoolController
    from sparsespec.deploy.flags import check_service_flags

    check_service_flags(config)
    init_ray(address, config.name)
    try:
        ray.get_actor(CONTROLLER, namespace=config.name)
    except ValueError:
        pass
    else:
        raise SparseSpecError(f"name: a deployment named {config.name!r} is already up "
                              f"(sparsespec ray down --name {config.name})")
    resources = {HEAD_RESOURCE: 0.001} if HEAD_RESOURCE in ray.cluster_resources() else {}
    controller = ray.remote(PoolController).options(
        name=CONTROLLER, namespace=config.name, lifetime="detached", num_cpus=0, max_concurrency=16,
        resources=resources).remote(config.to_dict())
    dep = Deployment(config.name, controller)
    try:
        dep.wait_ready(timeout_s)
    except BaseException:
        dep.down()
        raise
    return dep


def connect(name: str = "sparsespec", address: str | None = "auto") -> Deployment:
    """The deployment `name` that `up` started earlier, from any process."""
    import ray

    init_ray(address, name)
    try:
        return Deployment(name, ray.get_actor(CONTROLLER, namespace=name))
    except ValueError:
        raise SparseSpecError(f"name: no deployment named {name!r} on this Ray cluster "
                              f"(sparsespec ray up --config FILE)") from None
