"""Check each pool's service flags against the service's own parser, before Ray is touched.

A typo in a deployment file (`max_bach: 8`) would otherwise surface only as a replica that
exits at start on some node; here it fails `sparsespec ray up` at once, naming the pool.
"""

from __future__ import annotations

import argparse

from sparsespec.deploy.config import DeployConfig
from sparsespec.errors import InvalidArgument


def _parser(role: str) -> argparse.ArgumentParser:
    if role == "verifier":
        from verifier_service.server import build_parser
    elif role == "gateway":
        from sparsespec.gateway.server import build_parser
    else:
        from drafter_service.server import build_parser
    parser = build_parser()
    parser.exit_on_error = False    # bad values raise ArgumentError instead of exiting
    return parser


def check_service_flags(cfg: DeployConfig) -> None:
    for role in cfg.pools:
        flags = cfg.service_flags(role)             # a gateway's with what it inherits from the verifiers
        try:
            _, unknown = _parser(role).parse_known_args(["--model", cfg.model, "--redis", cfg.redis_url, *flags])
        except argparse.ArgumentError as e:
            raise InvalidArgument(f"pools.{role}.args", f"{e} (see sparsespec serve {role} --help)") from None
        if unknown:
            raise InvalidArgument(f"pools.{role}.args", f"unknown flag {unknown[0]} "
                                                        f"(see sparsespec serve {role} --help)")
