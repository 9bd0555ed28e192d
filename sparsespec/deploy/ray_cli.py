"""`sparsespec ray` (placeholder until the Ray deployment lands: refuses clearly)."""

from __future__ import annotations

from sparsespec.errors import SparseSpecError


def add_parser(sub) -> None:
    sub.add_parser("ray", help="drafter and verifier pools on a Ray cluster")


def run(args) -> int:
    raise SparseSpecError("ray: not available yet")
