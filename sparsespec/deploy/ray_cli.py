"""`sparsespec ray up|status|scale|down`: drafter, verifier and gateway pools on a Ray cluster.

`up` reads one deployment file (deploy/ray/*.yaml), validates it before touching Ray, starts the
pools and returns once they serve, printing one `verifier NAME ADDRESS` / `drafter NAME ADDRESS`
/ `gateway NAME URL` line per replica, `http URL[,URL...]` (the OpenAI gateways, when the file has
a gateway pool) and `ready ADDR[,ADDR...]` (the verifiers, for the SDK). The pools keep running
in the cluster; `status`, `scale` and `down` find them by name.
"""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    ray = sub.add_parser("ray", help="drafter, verifier and gateway pools on a Ray cluster: ray up|status|scale|down")
    rsub = ray.add_subparsers(dest="ray_command", required=True)

    def common(p, with_name=True):
        p.add_argument("--address", default="auto",
                       help="Ray cluster HOST:PORT (default: auto = $RAY_ADDRESS or the local `ray start`)")
        if with_name:
            p.add_argument("--name", default="sparsespec", help="the deployment's name (its Ray namespace)")

    up = rsub.add_parser("up", help="start the pools of a deployment file and wait until they serve")
    up.add_argument("--config", required=True, help="deployment file (YAML), see deploy/ray/")
    up.add_argument("--timeout-s", type=float, default=600.0, help="how long to wait for every replica")
    common(up, with_name=False)
    status = rsub.add_parser("status", help="pools, replicas, addresses and recent events")
    status.add_argument("--json", action="store_true")
    common(status)
    scale = rsub.add_parser("scale", help="set a pool's replica count (within its min/max)")
    scale.add_argument("pool", help="verifier | drafter | gateway")
    scale.add_argument("replicas", type=int)
    scale.add_argument("--wait", action="store_true", help="wait until the pool has that many ready replicas")
    common(scale)
    down = rsub.add_parser("down", help="stop every replica (gateways, then verifiers, which drain) and the controller")
    common(down)


def _print_replicas(status: dict) -> None:
    for role, pool in status["pools"].items():
        for r in pool["replicas"]:
            print(f"{role} {r['name']} {r['address'] or '-'} {r['state']}", flush=True)


def run(args) -> int:
    """Ray's own failures (a lost actor, a cluster gone) end as one line too."""
    import ray

    from sparsespec.errors import SparseSpecError

    try:
        return _run(args)
    except ray.exceptions.RayError as e:
        raise SparseSpecError(f"ray: {str(e).strip().splitlines()[0]}") from None


def _run(args) -> int:
    from sparsespec.deploy.api import connect, up
    from sparsespec.deploy.config import load_config

    if args.ray_command == "up":
        cfg = load_config(args.config)          # a bad file fails here, before Ray is touched
        dep = up(cfg, args.address, args.timeout_s)
        _print_replicas(dep.status())
        if dep.gateway_urls():
            print(f"http {','.join(dep.gateway_urls())}", flush=True)
        print(f"ready {','.join(dep.verifier_addresses())}", flush=True)
        return 0
    dep = connect(args.name, args.address)
    if args.ray_command == "status":
        status = dep.status()
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            for role, pool in status["pools"].items():
                print(f"{role}: {pool['desired']} wanted in [{pool['min_replicas']}, {pool['max_replicas']}], "
                      f"resources {pool['resources']}, replaced {pool['replaced']}"
                      + (f", last error: {pool['last_error']}" if pool["last_error"] else ""))
            _print_replicas(status)
        return 0
    if args.ray_command == "scale":
        dep.scale(args.pool, args.replicas)
        if args.wait:
            dep.wait_ready()
        _print_replicas(dep.status())
        return 0
    dep.down()
    print(f"down {args.name}", flush=True)
    return 0
