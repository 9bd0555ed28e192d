"""How many replicas a pool wants, from the sessions its workers report in the Redis registry.

Each worker's heartbeat carries its load (sessions held). A pool wants
ceil(total load / target_load) replicas, clamped to [min_replicas, max_replicas]. Growing is
immediate (new replicas take a while to load a model); shrinking waits until the lower want has
held for downscale_delay_s, so a short lull does not tear down replicas a burst needs back.
Ray's own cluster autoscaler then adds or removes nodes of the right type for the pending actors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class PoolAutoscaler:
    min_replicas: int
    max_replicas: int
    target_load: int
    downscale_delay_s: float
    _low_since: float | None = field(default=None, init=False)

    def want(self, total_load: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, math.ceil(total_load / self.target_load)))

    def decide(self, now: float, current: int, total_load: int) -> int:
        """The replica count to run from `now` on, given `current` and the pool's total load."""
        want = self.want(total_load)
        if want >= current:
            self._low_since = None
            return want
        if self._low_since is None:
            self._low_since = now
        if now - self._low_since >= self.downscale_delay_s:
            self._low_since = None
            return want
        return current
