"""Prometheus metrics of the services (`/metrics`), named in vLLM's style (`sparsespec:...`).

Not to be confused with sparsespec/spec/metrics.py, the per-request speculation statistics
(RequestMetrics) a response carries: the speculation counters here are those statistics added up
when a turn finishes (`turn_finished`), so `/metrics` and the responses cannot disagree and
nothing is counted twice. The rest is observed where it happens: a round's time (the scheduler),
a token's arrival (Job), a draft RPC (GrpcDrafterClient), a re-bind (RoutingDrafterClient), a
take-over (the servicer); gauges are read when scraped. Every process exposes the default
registry (with process and Python metrics): the verifier and the drafter on `--metrics-port`
(plain HTTP), the gateway on its own `/metrics` route. docs/deploy.md, "Metrics", lists them;
deploy/grafana/sparsespec.json draws them.
"""

from __future__ import annotations

import time

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest, start_http_server

from sparsespec.errors import InvalidArgument

P = "sparsespec:"
MAX_POSITIONS = 64         # per-position counters exist up to MAX_K

# --- speculation: RequestMetrics, added up per finished turn (verifier) ---------------------------
NUM_DRAFTS = Counter(P + "spec_decode_num_drafts", "Speculative rounds (each drafts k tokens)")
NUM_DRAFT_TOKENS = Counter(P + "spec_decode_num_draft_tokens", "Tokens the drafter proposed")
NUM_ACCEPTED_TOKENS = Counter(P + "spec_decode_num_accepted_tokens", "Drafted tokens the verifier accepted")
ACCEPTED_PER_POS = Counter(P + "spec_decode_num_accepted_tokens_per_pos",
                           "Accepted drafts at each draft position (0 = the first)", ["position"])
DRAFTED_PER_POS = Counter(P + "spec_decode_num_draft_tokens_per_pos",
                          "Drafts at each draft position: the denominator of alpha per position", ["position"])
TAU = Histogram(P + "spec_decode_mean_acceptance_length", "Per turn: tokens committed per verifier forward (tau)",
                buckets=(1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0))
GENERATION_TOKENS = Counter(P + "generation_tokens", "Tokens generated (committed)")
PROMPT_TOKENS = Counter(P + "prompt_tokens", "Prompt tokens of finished turns")
REQUESTS = Counter(P + "request_success", "Finished turns by stop reason", ["finished_reason"])
SUMMARIES = Counter(P + "summaries_sent", "KV summaries sent to drafters")
SUMMARY_BYTES = Counter(P + "summary_bytes", "Wire bytes of the KV summaries sent to drafters")
FEEDS = Counter(P + "feeds_sent", "KV feeds (the verifier's exact K/V) sent to fed drafters")
FEED_BYTES = Counter(P + "feed_bytes", "Wire bytes of the KV feeds sent to fed drafters")
DRAFTER_FAILURES = Counter(P + "drafter_failures", "Rounds a session decoded alone because its drafter failed")
PLAIN_STEPS = Counter(P + "num_plain_steps", "Verifier forwards that drafted nothing: AR turns, adaptive k switched "
                                              "off, calibrating or probing, a failed drafter")
ADAPTIVE_SEEDED = Counter(P + "adaptive_seeded", "Adaptive turns that started from their regime's prior "
                                                 "(the last verdict at their batch width and context)")

# --- timing (verifier) -------------------------------------------------------------------------------
LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TTFT = Histogram(P + "time_to_first_token_seconds", "Turn submitted -> its first durable token", buckets=LATENCY)
ITL = Histogram(P + "inter_token_latency_seconds", "Time per output token between durable updates",
                buckets=LATENCY)
ROUND = Histogram(P + "round_seconds", "One round of the verifier's loop (draft + verify all sessions)",
                  buckets=LATENCY)
DRAFT_RPC = Histogram(P + "draft_rpc_seconds", "One Draft/DraftBatch call to a drafter, as the verifier waits",
                      buckets=LATENCY)
REBINDS = Counter(P + "drafter_rebinds", "Sessions re-opened on a (possibly other) drafter after a failure")
RESUMES = Counter(P + "session_resumes", "Turns taken over from the log (resumed on this verifier)")

# --- gauges, read when scraped -----------------------------------------------------------------------
RUNNING = Gauge(P + "num_requests_running", "Turns holding a verifier cache row")
WAITING = Gauge(P + "num_requests_waiting", "Turns queued for a row")
VERIFIER_KV = Gauge(P + "verifier_kv_bytes", "Verifier KV bytes of the sessions in its rows (running and parked)")
DRAFTER_DEVICE_KV = Gauge(P + "drafter_kv_device_bytes", "Drafter device KV bytes of its open sessions")
DRAFTER_HOST_KV = Gauge(P + "drafter_kv_host_bytes", "Drafter host-tier bytes of its open sessions")
DRAFTER_SESSIONS = Gauge(P + "drafter_sessions", "Sessions open on the drafter")

# --- the HTTP gateway --------------------------------------------------------------------------------
HTTP_REQUESTS = Counter(P + "http_requests", "Gateway requests by route and status", ["route", "status"])
HTTP_TTFT = Histogram(P + "http_time_to_first_token_seconds", "Gateway: request -> first token from a verifier",
                      buckets=LATENCY)


def turn_finished(m) -> None:
    """Add a finished turn's RequestMetrics (sparsespec.spec.metrics) to the counters."""
    NUM_DRAFTS.inc(m.rounds)
    NUM_DRAFT_TOKENS.inc(m.drafted)
    NUM_ACCEPTED_TOKENS.inc(m.accepted)
    for i, (d, a) in enumerate(zip(m.per_position_drafted[:MAX_POSITIONS], m.per_position_accepted)):
        DRAFTED_PER_POS.labels(str(i)).inc(d)
        ACCEPTED_PER_POS.labels(str(i)).inc(a)
    if m.verifier_forwards:
        TAU.observe(m.tau)
    PROMPT_TOKENS.inc(m.prompt_tokens)
    REQUESTS.labels(m.stop_reason or "unknown").inc()
    SUMMARIES.inc(m.summaries_sent)
    SUMMARY_BYTES.inc(m.summary_bytes)
    FEEDS.inc(m.feeds_sent)
    FEED_BYTES.inc(m.feed_bytes)
    DRAFTER_FAILURES.inc(m.drafter_failures)
    PLAIN_STEPS.inc(m.ar_steps)
    ADAPTIVE_SEEDED.inc(m.adaptive_seeded)


class TokenClock:
    """A turn's token arrivals: the first gives TTFT (from the turn's submission), every later
    token one inter-token latency (its update's gap / its tokens), so a turn of n tokens observes
    1 TTFT and n - 1 latencies. A resumed turn starts with tokens: no TTFT."""

    def __init__(self, fresh: bool):
        self.t0 = time.monotonic()
        self.last: float | None = None if fresh else self.t0

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.monotonic()
        GENERATION_TOKENS.inc(n)
        if self.last is None:           # the first token; any that came with it took no time
            TTFT.observe(now - self.t0)
            n -= 1
            self.last = now
        if n:
            gap = (now - self.last) / n
            for _ in range(n):
                ITL.observe(gap)
        self.last = now


def _safe(fn):
    """A gauge callback that reads another thread's state: 0 on a race, never a failed scrape."""
    def read():
        try:
            return fn()
        except (RuntimeError, AttributeError):
            return 0
    return read


def watch_verifier(scheduler, row_bytes) -> None:
    """row_bytes(n): the KV bytes a verifier row of n tokens holds (FullKVCache.row_bytes: a
    local layer keeps at most its ring)."""
    RUNNING.set_function(_safe(lambda: len(scheduler._active)))
    WAITING.set_function(_safe(lambda: scheduler._pending.qsize()))
    VERIFIER_KV.set_function(_safe(lambda: (
        sum(row_bytes(len(j.run.tokens)) for j in list(scheduler._active.values()) if j.run is not None)
        + sum(row_bytes(len(p.context)) for p in list(scheduler._parked.values())))))


def watch_drafter(host) -> None:
    DRAFTER_DEVICE_KV.set_function(_safe(host.used_bytes))
    DRAFTER_HOST_KV.set_function(_safe(host.used_host_bytes))
    DRAFTER_SESSIONS.set_function(_safe(host.load))


def serve(host: str, port: int | None) -> int | None:
    """`/metrics` over plain HTTP on host:port (0: a free port); returns the port (None: off)."""
    if port is None:
        return None
    if not 0 <= port <= 65535:
        raise InvalidArgument("metrics-port", f"must be in [0, 65535], got {port}")
    try:
        server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as e:
        raise InvalidArgument("metrics-port", f"cannot listen on {host}:{port}: {e.strerror}") from None
    return server.server_port


def exposition() -> bytes:
    """The text format, for a route of the caller's own server (the gateway)."""
    return generate_latest(REGISTRY)
