"""TrainConfig: one validated description of a BudgetDraft training run, plus the presets.

Every field is checked at construction and an error names it, so a bad run fails before any
model is loaded. The config is saved with each checkpoint; resume refuses a different one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from kvstore.cache.policies import get_policy
from sparsespec.errors import InvalidArgument

OBJECTIVES = ("hard", "tv", "kl", "lm")
"""hard: cross-entropy against the verifier's argmax (the paper; targets greedy acceptance).
tv: 1 - sum min(p, q) over the teacher's top-k (the sampling rejection rate, directly).
kl: KL(p || q) over the teacher's top-k plus one residual bucket (bounds tv by Pinsker).
lm: plain next-token cross-entropy on the text, no teacher (a control, not acceptance-aware)."""

DEFAULT_BUDGETS = {256: 0.4, 512: 0.3, 1024: 0.2, 2048: 0.1}


@dataclass(frozen=True)
class TrainConfig:
    verifier: str = "smollm2-135m"       # teacher: a known model name or a local HF dir / GGUF
    drafter: str = "layers:4"            # layers:N (the verifier's first N layers) or a HF dir
    data: str = "kjv"                    # kjv | a .txt file, a directory of .txt, a .jsonl (PG-19)
    heldout_docs: int = 4                # documents held out for evaluation (never trained on)
    prefix: int = 1792                   # context tokens before the continuation (no gradient)
    continuation: int = 256              # tokens trained on per window
    windows: int = 60                    # training windows (teacher targets computed once each)
    heldout_windows: int = 8             # held-out windows for the teacher-forced evaluation
    steps: int = 200
    lr: float = 1e-3
    min_lr_ratio: float = 0.1            # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    warmup: int = 15
    grad_clip: float = 1.0
    objective: str = "hard"
    lam: float = 0.5                     # weight of L_C (sparse views); 0 = full cache only
    budgets: dict[int, float] = field(default_factory=lambda: dict(DEFAULT_BUDGETS))
    views_per_step: int = 1              # sparse views (budgets drawn independently) per step
    policy: str = "chunk_topk"           # the drafter's inference policy, used for the views
    top_k: int = 32                      # teacher's soft targets: top-k probabilities kept
    freeze_embeddings: bool = True       # embeddings and head (tied in SmolLM2) not trained
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    save_every: int = 100                # steps between checkpoints (and at the end)
    eval_every: int = 0                  # steps between held-out evaluations (0: start and end only)

    def __post_init__(self):
        for name in ("heldout_docs", "prefix", "continuation", "windows", "heldout_windows", "steps",
                     "views_per_step", "top_k", "threads", "save_every"):
            _int(name, getattr(self, name), 1)
        for name in ("warmup", "eval_every", "seed"):
            _int(name, getattr(self, name), 0)
        if self.warmup >= self.steps:
            raise InvalidArgument("warmup", f"must be < steps ({self.steps}), got {self.warmup}")
        for name, lo, hi in (("lr", 0.0, 1.0), ("min_lr_ratio", 0.0, 1.0), ("weight_decay", 0.0, 1.0)):
            _float(name, getattr(self, name), lo, hi, open_low=name == "lr")
        _float("grad_clip", self.grad_clip, 0.0, math.inf, open_low=True)
        _float("lam", self.lam, 0.0, math.inf)
        if self.objective not in OBJECTIVES:
            raise InvalidArgument("objective", f"must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "lm" and self.lam:
            raise InvalidArgument("lam", "the lm control trains the full cache only: lam must be 0")
        get_policy(self.policy)
        if get_policy(self.policy).keeps_all:
            raise InvalidArgument("policy", "sparse views need a budgeted policy, not 'full'")
        object.__setattr__(self, "budgets", _budgets(self.budgets))
        if not self.drafter:
            raise InvalidArgument("drafter", "is empty")
        self.drafter_layers()   # validates N of layers:N
        if not self.data:
            raise InvalidArgument("data", "is empty")

    @property
    def window(self) -> int:
        """Tokens per training window: prefix + continuation."""
        return self.prefix + self.continuation

    def drafter_layers(self) -> int | None:
        if not self.drafter.startswith("layers:"):
            return None
        try:
            n = int(self.drafter.split(":", 1)[1])
        except ValueError:
            raise InvalidArgument("drafter", f"expected layers:N, got {self.drafter!r}") from None
        if n < 1:
            raise InvalidArgument("drafter", f"layers:N needs N >= 1, got {n}")
        return n

    def to_dict(self) -> dict:
        d = asdict(self)
        d["budgets"] = {str(b): w for b, w in self.budgets.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidArgument(unknown[0], "is not a TrainConfig field")
        d = dict(d)
        if "budgets" in d:
            d["budgets"] = {int(b): float(w) for b, w in d["budgets"].items()}
        return cls(**d)

    def with_overrides(self, **changes) -> "TrainConfig":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def parse_budgets(text: str) -> dict[int, float]:
    """'256:0.4,512:0.3' -> {256: 0.4, 512: 0.3} (weights are normalised later)."""
    out: dict[int, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        b, sep, w = part.partition(":")
        try:
            out[int(b)] = float(w) if sep else 1.0
        except ValueError:
            raise InvalidArgument("budgets", f"expected BUDGET:WEIGHT pairs, got {part!r}") from None
    return out


def _budgets(budgets) -> dict[int, float]:
    if not isinstance(budgets, dict) or not budgets:
        raise InvalidArgument("budgets", "needs at least one BUDGET:WEIGHT pair")
    for b, w in budgets.items():
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise InvalidArgument("budgets", f"budget must be a positive integer, got {b!r}")
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise InvalidArgument("budgets", f"weight of budget {b} must be > 0, got {w!r}")
    total = float(sum(budgets.values()))
    return {int(b): float(w) / total for b, w in sorted(budgets.items())}


def _int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidArgument(name, f"must be >= {minimum}, got {value}")


def _float(name: str, value, lo: float, hi: float, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(name, f"must be a finite number, got {value!r}")
    if value < lo or value > hi or (open_low and value == lo):
        raise InvalidArgument(name, f"must be in {'(' if open_low else '['}{lo}, {hi}], got {value}")


# The CPU preset: what this 2-core machine trains in under an hour per variant (docs/training.md).
CPU_PRESET = TrainConfig()

# The paper's sizes (16K windows, 5000 steps, lr 1e-5, 150 warmup) for a GPU. It needs a verifier
# with >= 16,384 positions: no packaged model has one, so --verifier must name it.
GPU_PRESET = TrainConfig(prefix=16128, continuation=256, windows=5000, heldout_windows=32, steps=5000,
                         lr=1e-5, warmup=150, drafter="layers:4", device="cuda", threads=8,
                         save_every=500, eval_every=500)

PRESETS = {"cpu": CPU_PRESET, "gpu": GPU_PRESET}
