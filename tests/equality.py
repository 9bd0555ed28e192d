"""Greedy equality with a near-tie escape hatch that must be proven, never assumed.

A k-token verify and a 1-token decode sum floating-point terms in different orders. If that ever
flips a greedy choice, the first differing position must be a near-tie of the verifier's own
logits (top-2 gap below NEAR_TIE); anything else is a real bug and fails.
"""

from __future__ import annotations

import torch

from kvstore.cache.full import FullKVCache

NEAR_TIE = 1e-4  # fp32 logits


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def top2_gap(model, context: list[int]) -> float:
    cache = FullKVCache.for_model(model, len(context) + 1)
    logits = model(torch.tensor([context], device=model.device), cache, last_only=True)[0, -1]
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def assert_greedy_equal(model, prompt: list[int], reference: list[int], candidate: list[int], label=""):
    i = first_difference(reference, candidate)
    if i is None:
        return
    if i >= min(len(reference), len(candidate)):
        raise AssertionError(f"{label}: lengths differ ({len(reference)} vs {len(candidate)}) with equal prefix")
    gap = top2_gap(model, list(prompt) + reference[:i])
    assert gap < NEAR_TIE, (f"{label}: token {i} differs ({reference[i]} vs {candidate[i]}) and the "
                            f"verifier's top-2 gap there is {gap:.3g} >= {NEAR_TIE}: not a near-tie")
