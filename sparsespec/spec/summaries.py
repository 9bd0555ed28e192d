"""When the verifier sends a session's drafter a KV summary (kvstore/cache/summary.py has what it is).

Per session: at the first round the drafter says it reads summaries, then at least every R
rounds, early when the acceptance of the last few rounds drops below a threshold, and when the
context grew by G tokens since the last one; never two closer than a minimum gap. A re-opened
drafter (after a failure, or a replacement) gets the latest summary with its prefix.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvstore.cache.summary import SummaryWant
from sparsespec.errors import InvalidArgument


@dataclass(frozen=True)
class ScheduleConfig:
    """When a session's drafter gets a summary. Validated here; errors name the field."""

    every_rounds: int = 8         # R: send at least every R rounds
    alpha_threshold: float = 0.5  # send early when the windowed alpha drops below this
    alpha_window: int = 4         # rounds in that window
    growth: int = 256             # G: send when the context grew this much since the last one
    min_gap_rounds: int = 2       # never two summaries closer than this (a low alpha must not spam)

    def __post_init__(self):
        for name in ("every_rounds", "alpha_window", "growth", "min_gap_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"summary.{name}", f"must be an integer >= 1, got {value!r}")
        if not 0.0 <= self.alpha_threshold <= 1.0:
            raise InvalidArgument("summary.alpha_threshold", f"must be in [0, 1], got {self.alpha_threshold}")


@dataclass
class SummarySchedule:
    config: ScheduleConfig
    want: SummaryWant | None = None     # from the drafter's last reply; None = it reads none
    latest: bytes | None = None         # the last summary made (or restored from Redis)
    sent: int = 0                       # summaries delivered
    bytes_sent: int = 0
    dirty: bool = False                 # `latest` changed since the owner last persisted it
    _since: int = 0                     # rounds since the last delivery
    _len_at_last: int = 0
    _recent: deque = field(default_factory=deque)   # (drafted, accepted) since the last delivery

    def due(self, length: int, reopen: bool) -> bool:
        c = self.config
        if reopen:
            return self.want is not None or self.latest is not None
        if self.want is None:
            return False
        if self.sent == 0:
            return True
        if self._since < c.min_gap_rounds:
            return False
        if self._since >= c.every_rounds or length - self._len_at_last >= c.growth:
            return True
        if len(self._recent) < c.alpha_window:
            return False
        drafted = sum(d for d, _ in self._recent)
        return drafted > 0 and sum(a for _, a in self._recent) / drafted < c.alpha_threshold

    def observe(self, drafted: int, accepted: int) -> None:
        """A round finished (drafted 0 for a plain step)."""
        self._since += 1
        if drafted:
            self._recent.append((drafted, accepted))
            while len(self._recent) > self.config.alpha_window:
                self._recent.popleft()

    def delivered(self, data: bytes, length: int, fresh: bool) -> None:
        self.sent += 1
        self.bytes_sent += len(data)
        self._since, self._len_at_last = 0, length
        self._recent.clear()
        if fresh:
            self.latest, self.dirty = data, True
