"""Sampling parameters and the two distributions of a round.

p (target): the verifier's logits after temperature / top-k / top-p, dense over the vocabulary.
q (draft): the drafter's logits after the same processing, capped to its `q_support` most likely
tokens and renormalised, so it travels exactly as a sparse vector. The draft token is sampled
from exactly this q, which is what makes the rejection rule lossless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsespec.errors import InvalidArgument


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0            # 0 = off
    seed: int | None = None
    q_support: int = 32       # draft distribution support cap

    def __post_init__(self):
        # inf temperature passes ">= 0" and would silently sample uniformly: finite only
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise InvalidArgument("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidArgument("top_p", f"must be a finite number in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument("top_k", f"must be >= 0, got {self.top_k}")
        if self.q_support < 1:
            raise InvalidArgument("q_support", f"must be >= 1, got {self.q_support}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, salt: int = 0) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(((self.seed if self.seed is not None else torch.seed()) + salt) % (2 ** 63))
        return g


@dataclass(frozen=True)
class SparseDist:
    """A distribution with small support: ids [S] int64, probs [S] float32 (sum 1)."""
    ids: torch.Tensor
    probs: torch.Tensor

    def dense(self, vocab: int) -> torch.Tensor:
        out = torch.zeros(vocab, dtype=torch.float32)
        out[self.ids] = self.probs
        return out

    def prob_of(self, token: int) -> float:
        hit = (self.ids == token).nonzero()
        return float(self.probs[hit[0, 0]]) if len(hit) else 0.0


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [N, V] -> p [N, V] float32 after temperature, top-k and top-p."""
    x = logits.float() / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_x.softmax(-1)) >= params.top_p  # keep the minimal prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x.softmax(-1)


def draft_distribution(logits: torch.Tensor, params: SamplingParams) -> SparseDist:
    """logits [V] -> q as a SparseDist with at most q_support entries."""
    p = target_probs(logits.unsqueeze(0), params)[0]
    s = min(params.q_support, int((p > 0).sum()))
    probs, ids = torch.topk(p, s)
    return SparseDist(ids=ids, probs=probs / probs.sum())


def sample(probs: torch.Tensor, gen: torch.Generator) -> int:
    """One draw from probs [V]."""
    return int(torch.multinomial(probs, 1, generator=gen))
