"""Acceptance-aware objectives: what the drafter is trained to maximise is what spec decoding accepts.

Greedy verification accepts a draft iff it is the verifier's argmax, so `hard` is cross-entropy
against that argmax (the paper). Sampling accepts with probability sum_x min(p(x), q(x)), so
`tv` minimises the rejection rate 1 - sum min(p, q) directly, and `kl` minimises KL(p || q),
which bounds it (Pinsker: TV <= sqrt(KL / 2)). p is known on the teacher's top-k only; the rest
is one residual bucket of mass 1 - sum(top-k): both soft losses are exact on that coarsened
distribution, and coarsening can only understate them (so the residual must stay small: top-k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsespec.train.teacher import Targets

EPS = 1e-9


def objective_loss(objective: str, logits: torch.Tensor, t: Targets | None,
                   next_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """logits: [C, V] float32 student logits at the continuation positions. Returns a scalar.

    next_tokens: [C - 1] the text's own next tokens (only the `lm` control reads them).
    """
    if objective == "lm":
        return F.cross_entropy(logits[:-1], next_tokens)
    if objective == "hard":
        return F.cross_entropy(logits, t.argmax)
    logq = logits.log_softmax(-1)                                              # [C, V]
    q_top = logq.gather(-1, t.ids).exp()                                       # [C, K]
    p_rest = (1.0 - t.probs.sum(-1)).clamp_min(0.0)                            # [C]
    q_rest = (1.0 - q_top.sum(-1)).clamp_min(0.0)                              # [C]
    if objective == "tv":
        accept = torch.minimum(t.probs, q_top).sum(-1) + torch.minimum(p_rest, q_rest)
        return (1.0 - accept).mean()
    if objective == "kl":
        kl = (t.probs * (torch.log(t.probs + EPS) - torch.log(q_top + EPS))).sum(-1)
        kl = kl + p_rest * (torch.log(p_rest + EPS) - torch.log(q_rest + EPS))
        return kl.mean()
    raise ValueError(f"unknown objective {objective!r}")


@torch.no_grad()
def acceptance(logits: torch.Tensor, t: Targets) -> tuple[float, float]:
    """(greedy, sampling) one-step acceptance, teacher-forced, averaged over positions.

    greedy: the student's argmax is the verifier's. sampling: sum over the teacher's top-k of
    min(p, q) (a lower bound of the true sum min(p, q), exact when p's top-k holds all its mass).
    """
    greedy = (logits.argmax(-1) == t.argmax).float().mean().item()
    q_top = logits.softmax(-1).gather(-1, t.ids)                               # [C, K]
    sampling = torch.minimum(t.probs, q_top).sum(-1).mean().item()
    return greedy, sampling
