"""Per-request speculation metrics, in the vocabulary of design.md."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    prompt_tokens: int = 0
    generated: int = 0
    rounds: int = 0             # speculative rounds (k >= 1)
    ar_steps: int = 0           # verifier forwards without drafts (speculation off, or mode ar)
    drafted: int = 0
    accepted: int = 0
    k_sum: int = 0
    per_position_drafted: list[int] = field(default_factory=list)
    per_position_accepted: list[int] = field(default_factory=list)
    prefill_s: float = 0.0      # verifier prefill (and drafter prefill, in process)
    decode_s: float = 0.0       # everything after prefill
    draft_s: float = 0.0
    verify_s: float = 0.0
    drafter_kv_device_bytes: int = 0
    drafter_kv_host_bytes: int = 0
    verifier_kv_bytes: int = 0
    reused_prefix_tokens: int = 0  # multi-turn: prompt tokens whose KV was already cached
    drafter_failures: int = 0      # rounds decoded alone because the drafter failed
    adaptive_seeded: int = 0       # 1: adaptive k started from its regime's prior (spec/adaptive.py)
    draft_overhead_s: list[float] = field(default_factory=list)  # per round: draft call - drafter work (RPC)
    summaries_sent: int = 0        # KV summaries the verifier delivered to the drafter
    summary_bytes: int = 0         # their wire bytes, in total
    feeds_sent: int = 0            # KV feeds the verifier delivered to a fed drafter
    feed_bytes: int = 0            # their wire bytes, in total, of which:
    feed_open_bytes: int = 0       #   the session's first selection (and one after a drafter failure)
    feed_refreshes: int = 0        #   re-selections, and their bytes
    feed_refresh_bytes: int = 0
    feed_blocks: int = 0           #   rounds' committed K/V, and their bytes
    feed_block_bytes: int = 0
    feed_s: float = 0.0            # verifier time spent making feeds (in decode_s, outside draft_s and verify_s)
    stop_reason: str = ""

    def record_round(self, k: int, accepted: int) -> None:
        self.rounds += 1
        self.drafted += k
        self.accepted += accepted
        self.k_sum += k
        while len(self.per_position_drafted) < k:
            self.per_position_drafted.append(0)
            self.per_position_accepted.append(0)
        for i in range(k):
            self.per_position_drafted[i] += 1
            self.per_position_accepted[i] += int(i < accepted)

    @property
    def verifier_forwards(self) -> int:
        return self.rounds + self.ar_steps

    @property
    def alpha(self) -> float:
        """Acceptance rate: accepted / drafted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tau(self) -> float:
        """Mean accepted length: tokens committed per verifier forward (accepted + 1)."""
        f = self.verifier_forwards
        return (self.accepted + f) / f if f else 0.0

    @property
    def k(self) -> float:
        """Mean draft length over speculative rounds."""
        return self.k_sum / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "tau": round(self.tau, 4), "alpha": round(self.alpha, 4), "k": round(self.k, 3),
            "drafted": self.drafted, "accepted": self.accepted, "rounds": self.rounds,
            "ar_steps": self.ar_steps, "generated": self.generated, "prompt_tokens": self.prompt_tokens,
            "tokens_per_s": round(self.tokens_per_s, 3), "prefill_s": round(self.prefill_s, 4),
            "decode_s": round(self.decode_s, 4), "draft_s": round(self.draft_s, 4),
            "verify_s": round(self.verify_s, 4),
            "per_position_acceptance": [round(a / d, 4) for a, d in
                                        zip(self.per_position_accepted, self.per_position_drafted)],
            "drafter_kv_device_bytes": self.drafter_kv_device_bytes,
            "drafter_kv_host_bytes": self.drafter_kv_host_bytes,
            "verifier_kv_bytes": self.verifier_kv_bytes,
            "reused_prefix_tokens": self.reused_prefix_tokens,
            "drafter_failures": self.drafter_failures, "adaptive_seeded": self.adaptive_seeded,
            "summaries_sent": self.summaries_sent, "summary_bytes": self.summary_bytes,
            "feeds_sent": self.feeds_sent, "feed_bytes": self.feed_bytes,
            "feed_open_bytes": self.feed_open_bytes, "feed_refreshes": self.feed_refreshes,
            "feed_refresh_bytes": self.feed_refresh_bytes, "feed_blocks": self.feed_blocks,
            "feed_block_bytes": self.feed_block_bytes, "feed_s": round(self.feed_s, 4),
            "draft_overhead_p50_ms": round(_percentile(self.draft_overhead_s, 50) * 1e3, 3),
            "draft_overhead_p95_ms": round(_percentile(self.draft_overhead_s, 95) * 1e3, 3),
            "stop_reason": self.stop_reason,
        }


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))]
