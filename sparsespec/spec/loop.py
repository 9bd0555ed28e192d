"""The round loop: draft, verify in one forward, accept, commit. Many sessions, one verifier batch.

Plain autoregressive decoding (mode "ar") is the same loop with k = 0, so the AR baseline and
speculation share every line that could change an output.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import torch

from sparsespec.errors import ContextOverflow, InvalidArgument
from sparsespec.spec.acceptance import choose
from sparsespec.spec.adaptive import MAX_K, AdaptiveConfig, KController
from sparsespec.spec.metrics import RequestMetrics
from sparsespec.spec.sampling import SamplingParams
from sparsespec.spec.stopping import StopChecker
from sparsespec.spec.transport import DrafterClient
from sparsespec.spec.verifier import Verifier

MODES = ("spec", "ar")


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    k: int = 4
    adaptive: AdaptiveConfig = field(default_factory=lambda: AdaptiveConfig(enabled=False))
    stop: tuple[str, ...] = ()
    mode: str = "spec"

    def __post_init__(self):
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not self.prompt_ids:
            raise InvalidArgument("prompt", "is empty")
        if self.max_tokens < 1:
            raise InvalidArgument("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not 1 <= self.k <= MAX_K:
            raise InvalidArgument("k", f"must be in [1, {MAX_K}], got {self.k}")
        if self.mode not in MODES:
            raise InvalidArgument("mode", f"must be one of {MODES}, got {self.mode!r}")

    def check_fits(self, vocab_size: int, max_context: int) -> None:
        bad = [t for t in self.prompt_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidArgument("prompt", f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        if len(self.prompt_ids) >= max_context:
            raise ContextOverflow("prompt", f"{len(self.prompt_ids)} tokens leave no room in the "
                                            f"context limit of {max_context} tokens")


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    metrics: RequestMetrics


@dataclass
class _Run:
    """One session's state inside the loop."""
    session: str
    row: int
    req: GenerationRequest
    tokens: list[int]                       # committed: prompt + generated; tokens[-1] is pending
    stopper: StopChecker
    ctrl: KController
    metrics: RequestMetrics
    gen: torch.Generator | None
    drafter_base: int = 0                   # committed tokens the drafter has seen
    done: bool = False
    finished_at: float = 0.0                # perf_counter() when the run stopped

    @property
    def generated(self) -> list[int]:
        return self.stopper.tokens


class SpecEngine:
    """Verifier model + full cache, and a drafter reached through a DrafterClient."""

    def __init__(self, verifier_model, drafter: DrafterClient | None = None, tokenizer=None,
                 max_context: int | None = None, max_batch: int = 8, eos_ids=None):
        self.model = verifier_model
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.max_context = max_context or verifier_model.max_context
        if self.max_context > verifier_model.max_context:
            raise InvalidArgument("max_context", f"{self.max_context} exceeds the model's "
                                                 f"{verifier_model.max_context}")
        self.max_batch = max_batch
        self.eos_ids = tuple(eos_ids if eos_ids is not None else verifier_model.cfg.eos_token_ids)
        # Room past the context limit for the drafts of a last round and batch padding.
        self.verifier = Verifier(verifier_model, self.max_context + MAX_K + 1, max_batch)

    def generate(self, req: GenerationRequest) -> GenerationResult:
        return self.generate_many([req])[0]

    def generate_many(self, reqs: list[GenerationRequest]) -> list[GenerationResult]:
        if not reqs:
            return []
        if len(reqs) > self.max_batch:
            raise InvalidArgument("requests", f"{len(reqs)} sessions exceed max_batch {self.max_batch}")
        for r in reqs:
            r.check_fits(self.model.cfg.vocab_size, self.max_context)
            if r.mode == "spec" and self.drafter is None:
                raise InvalidArgument("mode", "spec needs a drafter")
        runs = [self._start(i, r) for i, r in enumerate(reqs)]
        t0 = time.perf_counter()
        try:
            while True:
                active = [r for r in runs if not r.done]
                if not active:
                    break
                self._round(active)
        finally:
            for r in runs:
                if r.req.mode == "spec":
                    self.drafter.close(r.session)
        results = []
        for r in runs:
            m = r.metrics
            m.decode_s = r.finished_at - t0
            m.generated = len(r.generated)
            m.stop_reason = r.stopper.reason
            m.verifier_kv_bytes = len(r.tokens) * self.model.cfg.kv_bytes_per_token(
                self.model.dtype.itemsize)
            results.append(GenerationResult(list(r.generated), r.stopper.final_text(), m))
        return results

    def _start(self, row: int, req: GenerationRequest) -> _Run:
        prompt = list(req.prompt_ids)
        metrics = RequestMetrics(prompt_tokens=len(prompt))
        session = uuid.uuid4().hex
        t0 = time.perf_counter()
        self.verifier.prefill(row, prompt[:-1])
        if req.mode == "spec":
            self.drafter.open(session, prompt, req.sampling)
        metrics.prefill_s = time.perf_counter() - t0
        stopper = StopChecker(self.eos_ids, list(req.stop), req.max_tokens,
                              self.max_context - len(prompt), self.tokenizer)
        gen = None if req.sampling.greedy else req.sampling.generator()
        return _Run(session, row, req, prompt, stopper, KController(req.k, req.adaptive), metrics,
                    gen, drafter_base=len(prompt))

    def _plan_k(self, r: _Run) -> int:
        if r.req.mode != "spec":
            return 0
        remaining = min(r.req.max_tokens - len(r.generated), self.max_context - len(r.tokens))
        return max(0, min(r.ctrl.next_k(), remaining - 1))

    def _round(self, active: list[_Run]) -> None:
        drafts: list[list[int]] = []
        qs = []
        draft_s = []
        for r in active:
            k = self._plan_k(r)
            if k == 0:
                drafts.append([]), qs.append(None), draft_s.append(0.0)
                continue
            t0 = time.perf_counter()
            reply = self.drafter.draft(r.session, r.drafter_base, r.tokens[r.drafter_base:], k,
                                       r.req.sampling)
            draft_s.append(time.perf_counter() - t0)
            r.drafter_base = len(r.tokens)
            r.metrics.drafter_kv_device_bytes = max(r.metrics.drafter_kv_device_bytes, reply.device_bytes)
            r.metrics.drafter_kv_host_bytes = max(r.metrics.drafter_kv_host_bytes, reply.host_bytes)
            drafts.append(reply.tokens), qs.append(reply.qs)

        t0 = time.perf_counter()
        logits = self.verifier.verify([r.row for r in active],
                                      [[r.tokens[-1]] + d for r, d in zip(active, drafts)])
        verify_s = time.perf_counter() - t0

        for r, d, q, ds, lg in zip(active, drafts, qs, draft_s, logits):
            outcome = choose(lg, d, q, r.req.sampling, r.gen)
            self.verifier.commit(r.row, len(r.tokens) + outcome.accepted)
            m = r.metrics
            m.draft_s += ds
            m.verify_s += verify_s
            if d:
                m.record_round(len(d), outcome.accepted)
                r.ctrl.observe_round(len(d), outcome.accepted, ds, verify_s)
            else:
                m.ar_steps += 1
                r.ctrl.observe_plain(verify_s)
            for token in outcome.committed_tokens(d):
                r.tokens.append(token)
                if r.stopper.feed(token):
                    r.done = True
                    r.finished_at = time.perf_counter()
                    break
