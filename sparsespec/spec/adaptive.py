"""Adaptive draft length: pick the k that maximises expected tokens per second, or switch off.

With per-token acceptance alpha, a round of k drafts commits E(k) = (1 - alpha^(k+1)) / (1 - alpha)
tokens and costs k * t_draft + t_verify(k), where t_verify(k) = t_ar + slope * k. Speculation is
switched off for the session when no k beats plain decoding (1 / t_ar), and probed again every
`probe_every` plain steps so it comes back when it would pay. None of this affects the output.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from sparsespec.errors import InvalidArgument

MAX_K = 64


@dataclass(frozen=True)
class AdaptiveConfig:
    enabled: bool = True
    k_min: int = 1
    k_max: int = 16
    ema: float = 0.3          # weight of the newest timing observation
    window: int = 8           # rounds whose accepted / drafted counts pool into alpha
    min_rounds: int = 4       # rounds of evidence before speculation may be switched off
    probe_every: int = 32     # plain steps between probes while speculation is off
    margin: float = 1.0       # speculation must beat AR by this factor to stay on

    def __post_init__(self):
        if not 1 <= self.k_min <= self.k_max <= MAX_K:
            raise InvalidArgument("k", f"need 1 <= k_min <= k_max <= {MAX_K}, got {self.k_min}..{self.k_max}")
        if not 1 <= self.min_rounds <= self.window:
            raise InvalidArgument("adaptive", f"need 1 <= min_rounds <= window, got {self.min_rounds}, {self.window}")


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens committed by a round of k drafts at per-token acceptance alpha (accepted + 1)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class KController:
    """One per session. `next_k()` -> k for the next round (0 = a plain verifier step)."""

    def __init__(self, k: int, cfg: AdaptiveConfig):
        self.cfg = cfg
        self.k = k
        self.alpha: float | None = None      # per-token acceptance: geometric MLE over the window
        self._rounds: deque[tuple[int, int]] = deque(maxlen=cfg.window)   # (accepted, rejected)
        self._rounds_on = 0                  # rounds observed since speculation was last switched on
        self.t_draft: float | None = None    # seconds per drafted token
        self.t_ar: float | None = None       # seconds per plain verifier step
        self.slope = 0.0                     # extra verify seconds per draft token
        self.off = False
        self._plain_since_probe = 0
        self._skip_draft_time = False        # the next round's draft seconds include a session open

    def next_k(self) -> int:
        if not self.cfg.enabled:
            return self.k
        if self.t_ar is None:
            return 0  # measure one plain step first: it calibrates the cost model
        if self.off:
            if self._plain_since_probe >= self.cfg.probe_every:
                self._plain_since_probe = 0
                return max(self.cfg.k_min, min(self.k, 4))
            return 0
        return self.k

    def riding_k(self) -> int:
        """k for a round whose verify is k + 1 wide anyway (other sessions of the batch draft):
        the best k once calibrated, even while switched off (a plain row would waste the width)."""
        if not self.cfg.enabled:
            return self.k
        return self.k if self.t_ar is not None else 0

    def skip_draft_time(self) -> None:
        """The coming round's draft time includes opening the drafter session (a fed drafter's
        first selection, or a prefill): not a per-token draft cost."""
        self._skip_draft_time = True

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.cfg.ema) * old + self.cfg.ema * new

    def observe_plain(self, seconds: float) -> None:
        self.t_ar = self._ema(self.t_ar, seconds)
        self._plain_since_probe += 1

    def observe_round(self, k: int, accepted: int, draft_s: float, verify_s: float) -> None:
        if not self.cfg.enabled or k == 0:
            return
        # Geometric MLE pooled over the window: `accepted` successes per round, one failure unless
        # all were accepted. (An EMA of per-round ratios let one unlucky round switch a session
        # off for probe_every steps: measured, 95 of 144 steps plain where speculation paid 1.2x.)
        self._rounds.append((accepted, 1 if accepted < k else 0))
        self._rounds_on += 1
        good = sum(a for a, _ in self._rounds)
        self.alpha = good / (good + sum(f for _, f in self._rounds))
        if self._skip_draft_time:
            self._skip_draft_time = False
        else:
            self.t_draft = self._ema(self.t_draft, draft_s / k)
        if self.t_ar is not None:
            self.slope = self._ema(self.slope, max(0.0, (verify_s - self.t_ar) / k))
        self._choose()

    def rate(self, k: int) -> float:
        """Expected committed tokens per second with k drafts per round."""
        cost = k * (self.t_draft or 0.0) + (self.t_ar or 0.0) + self.slope * k
        return expected_tokens(self.alpha or 0.0, k) / cost if cost > 0 else 0.0

    def _choose(self) -> None:
        if self.t_ar is None or self.alpha is None:
            return
        best = max(range(self.cfg.k_min, self.cfg.k_max + 1), key=self.rate)
        self.k = best
        losing = self.rate(best) < self.cfg.margin / self.t_ar
        if self.off and not losing:
            self.off, self._rounds_on = False, 0        # the probe paid: back on
        elif not self.off and losing and self._rounds_on >= self.cfg.min_rounds:
            self.off = True
            self._plain_since_probe = 0   # a full probe_every plain steps before the next probe
