"""Assertion helpers the model tests share: how far two tensors differ, and that an error is one
line naming what it should."""

from __future__ import annotations


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def one_line_error(excinfo, *needles) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg
