"""The drafter engine: a model over a SparseKVCache, one per session.

It follows the committed prefix the verifier sends (base_len + append), rolls back its own
rejected drafts, keeps the cache within budget (policy upkeep), and chain-drafts k tokens.
Its state is disposable: `start` rebuilds it from the committed tokens alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.cache.sparse import SparseConfig, SparseKVCache
from kvstore.cache.summary import Summary, SummaryWant
from sparsespec.errors import ContextOverflow, SparseSpecError
from sparsespec.spec.sampling import SamplingParams, SparseDist, draft_distribution, sample


class StateMismatch(SparseSpecError):
    """A Draft's base_len does not match the drafter's committed length: the verifier must re-sync."""


@dataclass
class DraftResult:
    tokens: list[int]                 # [k]
    qs: list[SparseDist] | None       # [k] draft distributions (sampling only)


class Drafter:
    def __init__(self, model, sparse: SparseConfig, capacity: int):
        self.model = model
        self.cache = SparseKVCache.for_model(model, capacity, sparse)
        self.committed_len = 0
        self._last_logits: torch.Tensor | None = None  # [V], after the last committed token
        self._drafts: list[int] = []                    # last round's drafts; d1..d_{k-1} are cached
        self._draft_logits: list[torch.Tensor] = []     # logits after each cached draft
        self.summaries = 0                              # summaries applied (a metric)

    @torch.inference_mode()
    def start(self, tokens: list[int]) -> None:
        """Prefill the committed tokens (prompt + pending token), then select the budget."""
        self.cache.truncate(0)
        self.committed_len = 0
        self._drafts, self._draft_logits = [], []
        self._append(tokens)

    @torch.inference_mode()
    def start_from(self, keys: list[torch.Tensor], values: list[torch.Tensor], tokens: list[int]) -> None:
        """`start(tokens)` for a drafter whose first n = keys[0].shape[1] tokens' K/V are already
        known exactly (SparseKVCache.adopt_prefix): only tokens[n:] are computed."""
        n = keys[0].shape[1]
        if not 0 < n < len(tokens):
            raise ValueError(f"a prefix of {n} entries needs more than {n} tokens, got {len(tokens)}")
        self.cache.truncate(0)
        self._drafts, self._draft_logits = [], []
        self.cache.adopt_prefix(keys, values)
        self.committed_len = n
        self._append(tokens[n:], upkeep_first=False)   # still the prefill phase: exact attention

    def _forward(self, tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor([tokens], device=self.model.device)
        return self.model(ids, self.cache, last_only=True)[0, -1]              # [V]

    def _append(self, tokens: list[int], upkeep_first: bool = True) -> None:
        """Append committed tokens, in pieces that fit the cache's tail, then run policy upkeep."""
        if upkeep_first:
            self.cache.upkeep()
        i = 0
        while i < len(tokens):
            room = self.cache.room()
            if room < 1:
                self.cache.upkeep(force=True)
                room = self.cache.room()
                if room < 1:
                    raise ContextOverflow("length", f"drafter KV capacity {self.cache.capacity} reached")
            piece = tokens[i:i + room]
            self._last_logits = self._forward(piece)
            i += len(piece)
        self.committed_len += len(tokens)
        self.cache.upkeep()

    @torch.inference_mode()
    def sync(self, base_len: int, append: list[int]) -> None:
        """Bring the cache to the committed prefix base_len + append.

        Cached drafts that the verifier accepted are kept (not recomputed); the rest is rolled back.
        """
        if base_len != self.committed_len:
            raise StateMismatch(f"base_len {base_len} does not match the drafter's committed length "
                                f"{self.committed_len}")
        if not append:   # nothing new: drop last round's cached drafts (logits stay valid)
            self.cache.truncate(base_len)
            self._drafts, self._draft_logits = [], []
            return
        reuse = 0
        cached = len(self._draft_logits)
        while reuse < min(cached, len(append) - 1) and append[reuse] == self._drafts[reuse]:
            reuse += 1
        self.cache.truncate(base_len + reuse)
        self.committed_len += reuse
        self._drafts, self._draft_logits = [], []
        self._append(append[reuse:])

    @torch.inference_mode()
    def draft(self, k: int, params: SamplingParams, gen: torch.Generator | None = None) -> DraftResult:
        """Chain-draft k tokens from the committed prefix. Drafts 1..k-1 stay cached for reuse."""
        if self.cache.room() < k:
            self.cache.upkeep(force=True)
            if self.cache.room() < k - 1:   # the last draft is never forwarded
                raise ContextOverflow("k", f"no room in the drafter KV for {k} drafts "
                                           f"(capacity {self.cache.capacity})")
        logits = self._last_logits
        tokens, qs = [], []
        for i in range(k):
            if params.greedy:
                token = int(logits.argmax())
            else:
                q = draft_distribution(logits, params)
                token = int(q.ids[sample(q.probs, gen)])
                qs.append(q)
            tokens.append(token)
            if i < k - 1:
                logits = self._forward([token])
                self._draft_logits.append(logits)
        self._drafts = tokens
        return DraftResult(tokens, None if params.greedy else qs)

    def take_summary(self, summary: Summary) -> None:
        """Take a decoded KV summary from the verifier (the host decodes it before any state
        changes, even when the policy ignores it, so a malformed one is refused everywhere)."""
        self.cache.set_summary(summary)
        self.summaries += 1

    def want(self) -> SummaryWant | None:
        """What a summary may hold for this drafter; None when its policy reads none."""
        c, policy = self.cache.config, self.cache.policy
        if not policy.uses_summary:
            return None
        return SummaryWant(slots=policy.summary_slots(c.budget - c.sink - c.window), sink=c.sink,
                           window=c.window)

    def device_bytes(self) -> int:
        return self.cache.device_bytes()
