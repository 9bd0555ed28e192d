"""The verifier's decision for one round: accepted drafts, then a recovered or a bonus token.

Greedy: drafts are accepted while they equal the verifier's argmax; the first mismatch is replaced
by the argmax (recovered); if all k are accepted the verifier's next argmax is the bonus.
Sampling (Leviathan et al. 2023; Chen et al. 2023): accept draft x_i with prob min(1, p_i(x)/q_i(x));
on the first rejection draw the recovered token from norm(max(0, p_i - q_i)); if all are accepted
draw the bonus from p_k. The output is distributed exactly as sampling from p alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsespec.spec.sampling import SamplingParams, SparseDist, sample, target_probs


@dataclass(frozen=True)
class RoundOutcome:
    accepted: int          # number of drafts kept (0..k)
    token: int             # recovered (accepted < k) or bonus (accepted == k)

    def committed_tokens(self, drafts: list[int]) -> list[int]:
        return list(drafts[:self.accepted]) + [self.token]


def accept_greedy(logits: torch.Tensor, drafts: list[int]) -> RoundOutcome:
    """logits [k+1, V] (the verifier's, position i predicts draft i; row k predicts the bonus)."""
    choice = logits.argmax(-1).tolist()                                         # [k+1]
    n = 0
    while n < len(drafts) and drafts[n] == choice[n]:
        n += 1
    return RoundOutcome(n, choice[n])


def accept_sampling(logits: torch.Tensor, drafts: list[int], qs: list[SparseDist],
                    params: SamplingParams, gen: torch.Generator,
                    ratio_rule=None) -> RoundOutcome:
    """logits [k+1, V]; qs[i] is the exact distribution draft i was drawn from.

    `ratio_rule(p_x, q_x) -> acceptance probability` exists only so tests can plug in a wrong rule
    and watch the statistical test fail.
    """
    p = target_probs(logits, params)                                            # [k+1, V]
    vocab = p.shape[-1]
    for i, (x, q) in enumerate(zip(drafts, qs)):
        p_x, q_x = float(p[i, x]), q.prob_of(x)
        keep = ratio_rule(p_x, q_x) if ratio_rule else (1.0 if q_x <= p_x else p_x / q_x)
        if torch.rand((), generator=gen).item() < keep:
            continue
        residual = (p[i] - q.dense(vocab)).clamp_min(0)
        total = float(residual.sum())
        return RoundOutcome(i, sample(residual / total if total > 0 else p[i], gen))
    return RoundOutcome(len(drafts), sample(p[len(drafts)], gen))


def choose(logits: torch.Tensor, drafts: list[int], qs: list[SparseDist] | None,
           params: SamplingParams, gen: torch.Generator | None) -> RoundOutcome:
    if params.greedy:
        return accept_greedy(logits, drafts)
    return accept_sampling(logits, drafts, qs or [], params, gen)
