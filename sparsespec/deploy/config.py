"""One deployment file: the model, Redis, and a pool per role with its own resource shape.

Validated when it is built, before anything starts, so a bad file fails `sparsespec ray up` with
one line that names the field (`pools.verifier.replicas: ...`). The Helm chart mirrors these
fields in values.yaml; deploy/ray/*.yaml are examples. Roles: verifier, drafter, and the OpenAI
HTTP gateway (`python -m sparsespec.gateway`), which finds the verifiers of the deployment's
model in the Redis registry and takes the verifier pool's API keys and certificate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from sparsespec.errors import InvalidArgument

ROLES = ("verifier", "drafter", "gateway")
from sparsespec.redis_server import REDIS_URL_ENV as REDIS_ENV   # keeps a password out of the file
# Flags the deployment sets itself for every replica; a pool's `args` may not override them.
MANAGED_FLAGS = ("model", "redis", "host", "port", "worker_id", "device")
# Minimum replicas per role: no verifier means no generation at all, no drafter means plain
# (slower, still correct) decoding, no gateway means gRPC clients only.
MIN_REPLICAS = {"verifier": 1, "drafter": 0, "gateway": 0}
# Roles whose replicas register in the Redis worker registry (and report load to the autoscaler).
REGISTERED = ("verifier", "drafter")
# What a gateway takes from the verifier pool's args unless its own args set it: the public API's
# keys and server certificate, so HTTP clients meet the same keys and TLS as gRPC clients.
GATEWAY_INHERITS = ("api_keys", "tls_cert", "tls_key")


def _arg(args: Mapping, name: str):
    """args[name], the key written with '-' or '_'."""
    for key, value in args.items():
        if str(key).replace("-", "_") == name:
            return value
    return None


def _flags(args: Mapping) -> list[str]:
    """{max_batch: 8, stop: [a, b], adaptive: true} -> --max-batch 8 --stop a --stop b --adaptive."""
    out: list[str] = []
    for key, value in args.items():
        flag = ("-" if len(str(key)) == 1 else "--") + str(key).replace("_", "-")
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is True:
                out.append(flag)
            elif v is not False and v is not None:
                out += [flag, str(v)]
    return out


def _unknown(where: str, given: Mapping, known) -> None:
    extra = sorted(set(given) - set(known))
    if extra:
        name = f"{where}.{extra[0]}" if where else extra[0]
        raise InvalidArgument(name, f"unknown key; known keys: {', '.join(sorted(known))}")


def _int(where: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgument(where, f"must be an integer >= {low}, got {value!r}")
    return value


def _number(where: str, value, low: float, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (strict and value == low):
        raise InvalidArgument(where, f"must be a number {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class PoolConfig:
    """One pool: how many replicas of a role, where Ray may place them, and their flags.

    `resources` is a Ray resource shape: CPU, GPU, memory (bytes) and any custom resource, e.g.
    {"GPU": 1, "accelerator_type:A10G": 0.001}. `target_load` is the sessions per replica the
    autoscaler aims for; it moves `replicas` within [min_replicas, max_replicas]."""

    role: str
    replicas: int = 1
    min_replicas: int | None = None     # default: replicas (no autoscaling)
    max_replicas: int | None = None     # default: replicas
    resources: Mapping[str, float] = field(default_factory=lambda: {"CPU": 1})
    target_load: int = 8
    port: int = 0                       # 0: any free port on the node
    args: Mapping[str, Any] = field(default_factory=dict)
    start_timeout_s: float = 300.0

    def __post_init__(self):
        at = f"pools.{self.role}"
        if self.role not in ROLES:
            raise InvalidArgument(at, f"unknown pool; known pools: {', '.join(ROLES)}")
        low = MIN_REPLICAS[self.role]
        why = " (a deployment without verifiers cannot generate)" if self.role == "verifier" else ""
        for name in ("replicas", "min_replicas"):
            value = getattr(self, name)
            if value is not None and _int(f"{at}.{name}", value, 0) < low:
                raise InvalidArgument(f"{at}.{name}", f"must be >= {low}{why}, got {value}")
        lo = self.replicas if self.min_replicas is None else self.min_replicas
        hi = self.replicas if self.max_replicas is None else _int(f"{at}.max_replicas", self.max_replicas, 1)
        object.__setattr__(self, "min_replicas", lo)
        object.__setattr__(self, "max_replicas", hi)
        if not lo <= self.replicas <= hi:
            raise InvalidArgument(f"{at}.replicas", f"must lie in [min_replicas, max_replicas] = [{lo}, {hi}], "
                                                    f"got {self.replicas}")
        if not isinstance(self.resources, Mapping) or not self.resources:
            raise InvalidArgument(f"{at}.resources", f"must be a non-empty mapping such as {{CPU: 1}}, "
                                                     f"got {self.resources!r}")
        for name, amount in self.resources.items():
            if not isinstance(name, str) or not name:
                raise InvalidArgument(f"{at}.resources", f"resource names must be strings, got {name!r}")
            _number(f"{at}.resources.{name}", amount, 0)
        _int(f"{at}.target_load", self.target_load, 1)
        if _int(f"{at}.port", self.port, 0) > 65535:
            raise InvalidArgument(f"{at}.port", f"must be in [0, 65535], got {self.port}")
        _number(f"{at}.start_timeout_s", self.start_timeout_s, 0, strict=True)
        if not isinstance(self.args, Mapping):
            raise InvalidArgument(f"{at}.args", f"must be a mapping of service flags, got {self.args!r}")
        for key in self.args:
            flag = str(key).replace("-", "_")
            if flag in MANAGED_FLAGS:
                raise InvalidArgument(f"{at}.args.{key}", "is set by the deployment for every replica "
                                                          "(use the top-level model / redis_url, or port)")

    @property
    def autoscaled(self) -> bool:
        return self.min_replicas < self.max_replicas

    @property
    def gpus(self) -> float:
        return float(self.resources.get("GPU", 0))

    def ray_options(self) -> dict[str, Any]:
        """The shape as ray.remote options: CPU/GPU/memory by name, the rest as custom resources."""
        opts: dict[str, Any] = {"num_cpus": float(self.resources.get("CPU", 0)), "num_gpus": self.gpus}
        if "memory" in self.resources:
            opts["memory"] = float(self.resources["memory"])
        custom = {k: float(v) for k, v in self.resources.items() if k not in ("CPU", "GPU", "memory")}
        if custom:
            opts["resources"] = custom
        return opts

    def service_flags(self) -> list[str]:
        """`args` as command-line flags: {max_batch: 8, stop: [a, b], adaptive: true} ->
        --max-batch 8 --stop a --stop b --adaptive."""
        return _flags(self.args)


@dataclass(frozen=True)
class AutoscaleConfig:
    """How often the controller looks at load, and how long load must stay low before it
    removes a replica (adding one is immediate)."""

    interval_s: float = 10.0
    downscale_delay_s: float = 60.0

    def __post_init__(self):
        _number("autoscale.interval_s", self.interval_s, 0, strict=True)
        _number("autoscale.downscale_delay_s", self.downscale_delay_s, 0)


@dataclass(frozen=True)
class DeployConfig:
    model: str
    redis_url: str
    pools: Mapping[str, PoolConfig]
    name: str = "sparsespec"            # the Ray namespace, and the prefix of actor names and worker ids
    dtype: str = "float32"
    max_context: int | None = None
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidArgument("model", "is required: a model directory, a .gguf file, or a known name, "
                                           "the same path on every node")
        if not isinstance(self.redis_url, str) or not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise InvalidArgument("redis_url", f"is required (or ${REDIS_ENV}): redis://[:PASSWORD@]HOST:PORT/DB, "
                                               f"got {self.redis_url!r}")
        if not isinstance(self.name, str) or not self.name.replace("-", "").isalnum():
            raise InvalidArgument("name", f"must be letters, digits and '-', got {self.name!r}")
        if "verifier" not in self.pools:
            raise InvalidArgument("pools.verifier", "is required: a deployment needs at least one verifier")
        if self.max_context is not None:
            _int("max_context", self.max_context, 1)
        from sparsespec.build import parse_dtype
        try:
            parse_dtype(self.dtype)
        except Exception as e:  # noqa: BLE001 - reworded with the field name below
            raise InvalidArgument("dtype", str(e)) from None
        if "gateway" in self.pools:
            self._check_gateway()

    def _check_gateway(self) -> None:
        """The gateway must be able to reach the verifiers: TLS to them exactly when they serve it."""
        v, g = self.pools["verifier"].args, self.pools["gateway"].args
        if _arg(v, "tls_client_ca"):
            raise InvalidArgument("pools.gateway", "the verifiers require client certificates "
                                                   "(pools.verifier.args.tls_client_ca), which the gateway does "
                                                   "not present; drop one of the two")
        ca = _arg(g, "verifier_tls_ca")
        if _arg(v, "tls_cert") and not ca:
            raise InvalidArgument("pools.gateway.args.verifier_tls_ca",
                                  "is required: the verifiers serve TLS (pools.verifier.args.tls_cert); give the "
                                  "CA that signed their certificate (a path on every node)")
        if ca and not _arg(v, "tls_cert"):
            raise InvalidArgument("pools.gateway.args.verifier_tls_ca",
                                  "the verifiers serve plaintext (pools.verifier.args has no tls_cert)")

    def pool_args(self, role: str) -> dict[str, Any]:
        """A pool's service args as written; a gateway's also get the verifier pool's API keys and
        certificate (GATEWAY_INHERITS) where they set none of their own."""
        args = dict(self.pools[role].args)
        if role == "gateway":
            own = {str(k).replace("-", "_") for k in args}
            for name in GATEWAY_INHERITS:
                value = _arg(self.pools["verifier"].args, name)
                if name not in own and value not in (None, False):
                    args[name] = value
        return args

    def service_flags(self, role: str) -> list[str]:
        return _flags(self.pool_args(role))

    def replica_flags(self, role: str, index: int) -> tuple[str, list[str]]:
        """(worker id, command line) of replica `index` of a pool; the replica adds --host."""
        p = self.pools[role]
        worker_id = f"{self.worker_prefix(role)}{index}"
        flags = ["--model", self.model, "--redis", self.redis_url, "--port", str(p.port)]
        if role in REGISTERED:          # the gateway loads only a tokenizer and registers nothing
            flags += ["--dtype", self.dtype, "--worker-id", worker_id]
            if self.max_context:
                flags += ["--max-context", str(self.max_context)]
            if p.gpus > 0:             # a pool that asks Ray for GPUs computes on one (both services take --device)
                flags += ["--device", "cuda"]
        return worker_id, flags + self.service_flags(role)

    def worker_prefix(self, role: str) -> str:
        """Worker ids of this deployment's replicas of `role` start with this (registry lookups)."""
        return f"{self.name}-{role}-"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DeployConfig":
        if not isinstance(data, Mapping):
            raise InvalidArgument("config", f"must be a mapping at the top level, got {type(data).__name__}")
        _unknown("", data, ("name", "model", "redis_url", "dtype", "max_context", "pools", "autoscale"))
        pools_in = data.get("pools") or {}
        if not isinstance(pools_in, Mapping):
            raise InvalidArgument("pools", "must map a role (verifier, drafter) to its pool")
        pools = {}
        for role, spec in pools_in.items():
            if role not in ROLES:
                raise InvalidArgument(f"pools.{role}", f"unknown pool; known pools: {', '.join(ROLES)}")
            spec = spec or {}
            if not isinstance(spec, Mapping):
                raise InvalidArgument(f"pools.{role}", f"must be a mapping, got {spec!r}")
            _unknown(f"pools.{role}", spec, PoolConfig.__dataclass_fields__.keys() - {"role"})
            pools[role] = PoolConfig(role=role, **spec)
        auto = data.get("autoscale") or {}
        _unknown("autoscale", auto, AutoscaleConfig.__dataclass_fields__.keys())
        return cls(model=data.get("model") or "", redis_url=data.get("redis_url") or os.environ.get(REDIS_ENV, ""),
                   pools=pools, name=data.get("name", "sparsespec"), dtype=data.get("dtype", "float32"),
                   max_context=data.get("max_context"), autoscale=AutoscaleConfig(**auto))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what travels to the controller actor)."""
        return {"name": self.name, "model": self.model, "redis_url": self.redis_url, "dtype": self.dtype,
                "max_context": self.max_context,
                "autoscale": {"interval_s": self.autoscale.interval_s,
                              "downscale_delay_s": self.autoscale.downscale_delay_s},
                "pools": {role: {"replicas": p.replicas, "min_replicas": p.min_replicas,
                                 "max_replicas": p.max_replicas, "resources": dict(p.resources),
                                 "target_load": p.target_load, "port": p.port, "args": dict(p.args),
                                 "start_timeout_s": p.start_timeout_s}
                          for role, p in self.pools.items()}}


def load_config(path: str) -> DeployConfig:
    """Read and validate a YAML (or JSON) deployment file."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise InvalidArgument("config", f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise InvalidArgument("config", f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return DeployConfig.from_dict(data or {})
