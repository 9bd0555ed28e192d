"""Teacher-forced acceptance on held-out windows, per budget: cheap, and the same views as training.

For each held-out window the student prefills the prefix once (no gradient), then reads the
continuation through each budget's view, exactly as a training step does, and is scored against
the verifier's cached targets. This is one-step acceptance on the text, not the chained
acceptance of real speculative decoding (sparsespec/train/spec_eval.py measures that).
"""

from __future__ import annotations

import torch

from sparsespec.train.cache import ContinuationCache
from sparsespec.train.losses import acceptance
from sparsespec.train.teacher import TeacherCache
from sparsespec.train.views import prefix_views

EVAL_BUDGETS: tuple[int | None, ...] = (128, 256, 512, 1024, None)   # None = full cache


def budget_name(b: int | None) -> str:
    return "full" if b is None else str(b)


@torch.no_grad()
def heldout_acceptance(model, windows: list[list[int]], teacher: TeacherCache, prefix: int,
                       policy: str, budgets=EVAL_BUDGETS) -> dict[str, dict[str, float]]:
    """{budget: {"greedy": mean argmax agreement, "sampling": mean sum min(p, q)}} over windows."""
    was_training = model.training
    model.eval()
    sums = {budget_name(b): [0.0, 0.0] for b in budgets}
    for w in windows:
        ids = torch.tensor([w], device=model.device)                            # [1, P + C]
        t = teacher.load(w)
        views = prefix_views(model, ids[:, :prefix], list(budgets), policy)
        for b in budgets:
            logits = model(ids[:, prefix:], ContinuationCache(views[b]))[0]     # [C, V]
            g, s = acceptance(logits.cpu(), t)
            sums[budget_name(b)][0] += g
            sums[budget_name(b)][1] += s
    model.train(was_training)
    n = max(1, len(windows))
    return {b: {"greedy": round(g / n, 4), "sampling": round(s / n, 4)} for b, (g, s) in sums.items()}
