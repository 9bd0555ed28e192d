"""Adaptive draft length: pick the k that maximises expected tokens per second, or switch off.

With per-token acceptance alpha, a round of k drafts commits E(k) = (1 - alpha^(k+1)) / (1 - alpha)
tokens and costs t_draft(k) + t_verify(k), each measured per k and, for a k not yet seen, on the
line through the two nearest measured ones (through (0, 0) for the drafts and (0, t_ar) for the
verify while only one is measured). Both costs are affine, not linear: a verify of k + 1 tokens
leaves the T = 1 fast path, and a draft round syncs the committed tokens first, so one slope from
one k misprices the others and drove k down round by round. A cost is the least of its last
`samples` timings: other work on the machine only ever adds time, and one slow step read as the
price of plain decoding kept a losing session on for good. t_ar is measured over `calibrate`
plain steps first and re-measured by one plain step every `refresh_every` rounds (a plain step
runs at AR's own speed, so it never costs a session its floor). Speculation is switched off for
the session when no k beats plain decoding (1 / t_ar) over `min_rounds` rounds, or at once when
none would even at the upper confidence bound of alpha (so a drafter that loses by 2x pays one
round to learn it, not four), and probed again after `probe_every` plain steps so it comes back
when it would pay (each probe that still loses doubles the wait, up to `probe_max`). The costs
belong to the regime (batch width, context), not to the session: a session starts from the
`Prior` the last one in its regime left (`seed`), so a losing regime is known before it pays a
learning round (at S = 8, 4K one costs the whole batch ~3 AR steps). None of this affects the
output.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from sparsespec.errors import InvalidArgument

MAX_K = 64


@dataclass(frozen=True)
class AdaptiveConfig:
    enabled: bool = True
    k_min: int = 1
    k_max: int = 16
    samples: int = 5          # a cost is the least of its last `samples` timings
    calibrate: int = 2        # plain steps that measure t_ar before the first round
    refresh_every: int = 16   # rounds between the plain steps that re-measure t_ar
    window: int = 8           # rounds whose accepted / drafted counts pool into alpha
    min_rounds: int = 4       # rounds before speculation losing at alpha's MLE is switched off
    confidence_z: float = 1.64   # off only when even alpha's upper bound at this z loses (one-sided 95%)
    probe_every: int = 32     # plain steps before the first probe while speculation is off
    probe_max: int = 512      # ... doubled by each probe that still loses, up to this
    margin: float = 1.0       # speculation must beat AR by this factor to stay on

    def __post_init__(self):
        if not 1 <= self.k_min <= self.k_max <= MAX_K:
            raise InvalidArgument("k", f"need 1 <= k_min <= k_max <= {MAX_K}, got {self.k_min}..{self.k_max}")
        if not 1 <= self.min_rounds <= self.window:
            raise InvalidArgument("adaptive", f"need 1 <= min_rounds <= window, got {self.min_rounds}, {self.window}")
        for name in ("samples", "calibrate", "refresh_every", "probe_every"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"adaptive.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.probe_max < self.probe_every:
            raise InvalidArgument("adaptive.probe_max", f"must be >= probe_every ({self.probe_every}), got {self.probe_max}")
        if not 0.0 <= self.confidence_z <= 10.0:
            raise InvalidArgument("adaptive.confidence_z", f"must be in [0, 10], got {self.confidence_z}")


def alpha_upper(accepted: int, rejected: int, z: float) -> float:
    """Upper Wilson score bound on alpha from `accepted` of `accepted + rejected` draft tokens
    judged (each judged token is one Bernoulli trial: a round stops at its first rejection).
    Wilson rather than the normal interval because the trials are few exactly where alpha is low."""
    n = accepted + rejected
    if n == 0:
        return 1.0
    p = accepted / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))


def regime(width: int, context: int) -> tuple[int, int]:
    """The key a `Prior` is kept under: the batch width a session drafts in and its context in
    half-octaves (4096 and 8000 apart: the verify's cost grows with both)."""
    return width, round(2 * math.log2(max(context, 1)))


@dataclass(frozen=True)
class Prior:
    """What a session learned about its regime, for the next session there: the plain step and
    round costs (the regime's), the k and verdict it ended with, and its probe wait. Alpha is not
    in it: acceptance belongs to a session's text, so each learns its own."""
    t_ar: float
    draft_at: dict[int, float]   # k -> seconds of a round's drafting
    verify_at: dict[int, float]  # k -> seconds of a (k+1)-token verify
    k: int
    off: bool
    probe_wait: int              # plain steps before its next probe, were it off


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
        self.alpha_hi: float | None = None   # its upper confidence bound (alpha_upper)
        self._rounds: deque[tuple[int, int]] = deque(maxlen=cfg.window)   # (accepted, rejected)
        self._rounds_on = 0                  # rounds observed since speculation was last switched on
        self._plain: deque[float] = deque(maxlen=cfg.samples)   # seconds of the last plain steps
        self._draft: dict[int, deque[float]] = {}    # k -> seconds of the last rounds' drafting at k
        self._verify: dict[int, deque[float]] = {}   # k -> seconds of the last (k+1)-token verifies
        self.t_ar: float | None = None               # seconds per plain step, once calibrated
        self.draft_at: dict[int, float] = {}         # k -> least of _draft[k]
        self.verify_at: dict[int, float] = {}        # k -> least of _verify[k]
        self.off = False
        self._plain_since_probe = 0
        self._probe_wait = cfg.probe_every           # plain steps before the next probe while off
        self._rounds_since_plain = 0
        self._skip_draft_time = False        # the next round's draft seconds include a session open

    def _plain_due(self) -> bool:
        """A plain step is due: calibrating t_ar, or re-measuring it while speculation is on."""
        return self.t_ar is None or (not self.off and self._rounds_since_plain >= self.cfg.refresh_every)

    def next_k(self) -> int:
        if not self.cfg.enabled:
            return self.k
        if self._plain_due():
            return 0
        if self.off:
            if self._plain_since_probe >= self._probe_wait:
                self._plain_since_probe = 0
                return max(self.cfg.k_min, min(self.k, 4))
            return 0
        return self.k

    def seed(self, prior: Prior) -> None:
        """Start from what the last session in this regime learned (before any step of this
        one): its costs as this session's first timings, its k, and its verdict, so a session
        in a losing regime starts plain (probing after the prior's wait) and one in a winning
        regime starts drafting without calibrating first."""
        if not self.cfg.enabled:
            return
        self._plain.append(prior.t_ar)
        self.t_ar = prior.t_ar
        for k, s in prior.draft_at.items():
            self._sample(self._draft, self.draft_at, k, s)
        for k, s in prior.verify_at.items():
            self._sample(self._verify, self.verify_at, k, s)
        self.k = max(self.cfg.k_min, min(prior.k, self.cfg.k_max))
        self.off, self._probe_wait = prior.off, max(self.cfg.probe_every, min(prior.probe_wait, self.cfg.probe_max))

    def learned(self) -> Prior | None:
        """This session's costs and verdict for the next session in its regime (None: it has
        not priced a round yet)."""
        if not self.cfg.enabled or self.t_ar is None or not self.verify_at:
            return None
        return Prior(self.t_ar, dict(self.draft_at), dict(self.verify_at), self.k, self.off, self._probe_wait)

    def batch_k(self, width: int) -> int:
        """k when the batch drafts `width`: a round's verify is as wide as its widest row and its
        draft forwards as many as its longest draft, so the sessions of a batch share one k (a
        plain row, or a short one, would pay that width for less) and each session's cost table
        then holds the batch's true cost at that k. Its own choice feeds the batch's median."""
        return 0 if self._plain_due() else width

    def skip_draft_time(self) -> None:
        """The coming round's draft time includes opening the drafter session (a fed drafter's
        first selection, or a prefill): not a per-token draft cost."""
        self._skip_draft_time = True

    def _sample(self, recent: dict[int, deque[float]], least: dict[int, float], k: int, seconds: float) -> None:
        times = recent.setdefault(k, deque(maxlen=self.cfg.samples))
        times.append(seconds)
        least[k] = min(times)

    def observe_plain(self, seconds: float) -> None:
        self._plain.append(seconds)
        if len(self._plain) >= min(self.cfg.calibrate, self.cfg.samples):
            self.t_ar = min(self._plain)
        self._plain_since_probe += 1
        self._rounds_since_plain = 0

    def observe_round(self, k: int, accepted: int, draft_s: float, verify_s: float) -> None:
        if not self.cfg.enabled or k == 0:
            return
        # Geometric MLE pooled over the window: `accepted` successes per round, one failure unless
        # all were accepted. (An EMA of per-round ratios let one unlucky round switch a session
        # off for probe_every steps: measured, 95 of 144 steps plain where speculation paid 1.2x.)
        self._rounds.append((accepted, 1 if accepted < k else 0))
        self._rounds_on += 1
        self._rounds_since_plain += 1
        good, bad = sum(a for a, _ in self._rounds), sum(f for _, f in self._rounds)
        self.alpha = good / (good + bad)
        self.alpha_hi = alpha_upper(good, bad, self.cfg.confidence_z)
        if self._skip_draft_time:
            self._skip_draft_time = False
        else:
            self._sample(self._draft, self.draft_at, k, draft_s)
        self._sample(self._verify, self.verify_at, k, verify_s)
        self._choose()

    @staticmethod
    def _at(table: dict[int, float], k: int, origin: float) -> float:
        """table's seconds at k: measured, or on the line through the two nearest measured k (or
        through (0, origin) and the one measured)."""
        if k in table:
            return table[k]
        if not table:
            return origin
        near = sorted(table, key=lambda j: (abs(j - k), j))[:2]
        if len(near) == 1:
            (k1, y1), (k2, y2) = (0, origin), (near[0], table[near[0]])
        else:
            (k1, y1), (k2, y2) = sorted((j, table[j]) for j in near)
        return max(0.0, y1 + max(0.0, (y2 - y1) / (k2 - k1)) * (k - k1))   # costs never fall with k

    def rate(self, k: int, alpha: float | None = None) -> float:
        """Expected committed tokens per second with k drafts per round (at alpha, default the MLE)."""
        t_ar = self.t_ar or 0.0
        cost = self._at(self.draft_at, k, 0.0) + max(t_ar, self._at(self.verify_at, k, t_ar))
        a = self.alpha if alpha is None else alpha
        return expected_tokens(a or 0.0, k) / cost if cost > 0 else 0.0

    def _choose(self) -> None:
        if self.t_ar is None or self.alpha is None:
            return
        ks = range(self.cfg.k_min, self.cfg.k_max + 1)
        self.k = max(ks, key=self.rate)
        plain = self.cfg.margin / self.t_ar
        winning = self.rate(self.k) >= plain
        if self.off:
            if winning:                                     # the probe paid: back on
                self.off, self._rounds_on, self._probe_wait = False, 0, self.cfg.probe_every
            else:                                           # still losing: wait longer
                self._probe_wait = min(2 * self._probe_wait, self.cfg.probe_max)
            return
        if winning:
            return          # at the MLE, so at alpha_hi >= alpha too: nothing more to price
        # Losing at alpha's MLE: off after min_rounds rounds of it, or at once when it loses even
        # at alpha's upper bound (a clear loser pays one round, a near-tie a few cheap ones).
        if self._rounds_on >= self.cfg.min_rounds or max(self.rate(k, self.alpha_hi) for k in ks) < plain:
            self.off = True
            self._plain_since_probe = 0   # a full wait before the next probe
