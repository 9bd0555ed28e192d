"""`sparsespec train` (placeholder until the trainer lands: refuses clearly)."""

from __future__ import annotations

from sparsespec.errors import SparseSpecError


def add_parser(sub) -> None:
    sub.add_parser("train", help="train a budget-robust drafter (BudgetDraft)")


def run(args) -> int:
    raise SparseSpecError("train: not available yet")
