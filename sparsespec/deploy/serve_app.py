"""The pools as a Ray Serve application, so KubeRay's RayService can own their lifecycle.

RayService (deploy/ray/kuberay-rayservice.yaml) starts a Ray cluster on Kubernetes and deploys
`sparsespec.deploy.serve_app:app` with `args: {config: FILE}`. The Serve replica brings the
pools up (or attaches to them after a restart), reports their state at its HTTP route, and its
health check fails while a pool is below its replica count, which RayService shows as unhealthy.
Generation traffic does not pass through Serve: clients speak gRPC to the verifiers, or HTTP to
the gateway pool's replicas.
"""

from __future__ import annotations

from sparsespec.errors import SparseSpecError


class PoolsApp:
    """Plain class (no Serve import), wrapped by `app` below; tests drive it directly."""

    def __init__(self, config: str, address: str | None = "auto", timeout_s: float = 900.0):
        from sparsespec.deploy.api import connect, up
        from sparsespec.deploy.config import load_config

        cfg = load_config(config)
        try:
            self.deployment = connect(cfg.name, address)     # a restarted Serve replica re-attaches
        except SparseSpecError:
            self.deployment = up(cfg, address, timeout_s)

    def check_health(self) -> None:
        """Raise while any pool has fewer ready replicas than it wants."""
        status = self.deployment.status()
        short = [f"{role}: {sum(r['state'] == 'ready' for r in p['replicas'])}/{p['desired']} ready"
                 for role, p in status["pools"].items()
                 if sum(r["state"] == "ready" for r in p["replicas"]) < p["desired"]]
        if short:
            raise SparseSpecError(f"pools below size: {'; '.join(short)}")

    def status(self) -> dict:
        status = self.deployment.status()
        status["verifiers"] = self.deployment.verifier_addresses()
        status["gateways"] = self.deployment.gateway_urls()
        return status

    def __call__(self, request) -> dict:     # sync: Serve runs it off the event loop
        return self.status()


def app(args: dict):
    """Serve application builder: `import_path: sparsespec.deploy.serve_app:app`, args {config: FILE}."""
    from ray import serve

    if "config" not in args:
        raise SparseSpecError("config: the application needs args.config, the deployment file's path")
    return serve.deployment(PoolsApp, name="sparsespec-pools", num_replicas=1,
                            ray_actor_options={"num_cpus": 0}).bind(args["config"])
