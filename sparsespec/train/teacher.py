"""Teacher targets: the verifier's full-cache predictions on each continuation, computed once.

They do not depend on the student, so every variant and every epoch reads them from disk: one
small file per window, keyed by the verifier, the window's tokens and the target shape. Kept:
the argmax (the hard target, greedy acceptance) and the top-k probabilities (soft targets,
sampling acceptance); the rest of the distribution is the residual mass 1 - sum(top-k).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kvstore.cache.full import FullKVCache


@dataclass
class Targets:
    argmax: torch.Tensor     # [C] int64: the verifier's greedy next token at each continuation position
    ids: torch.Tensor        # [C, K] int64: its top-k tokens, most probable first
    probs: torch.Tensor      # [C, K] float32: their probabilities (temperature 1)

    def to(self, device) -> "Targets":
        return Targets(self.argmax.to(device), self.ids.to(device), self.probs.to(device))


def fingerprint(model_dir: Path) -> str:
    """Identifies a verifier on disk: its config and the size and mtime of every file."""
    p = Path(model_dir)
    h = hashlib.sha256()
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    for f in files:
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


class TeacherCache:
    """On-disk targets for one (verifier, prefix, continuation, top_k)."""

    def __init__(self, root: Path, verifier_id: str, prefix: int, continuation: int, top_k: int):
        self.prefix, self.continuation, self.top_k = prefix, continuation, top_k
        key = hashlib.sha256(json.dumps([verifier_id, prefix, continuation, top_k]).encode()).hexdigest()[:16]
        self.dir = Path(root) / key
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, window: list[int]) -> Path:
        digest = hashlib.sha256(torch.tensor(window, dtype=torch.int64).numpy().tobytes()).hexdigest()[:24]
        return self.dir / f"{digest}.pt"

    def has(self, window: list[int]) -> bool:
        return self._path(window).is_file()

    def load(self, window: list[int]) -> Targets:
        d = torch.load(self._path(window), weights_only=True)
        return Targets(d["argmax"].long(), d["ids"].long(), d["probs"].float())

    def save(self, window: list[int], t: Targets) -> None:
        path = self._path(window)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"argmax": t.argmax.int(), "ids": t.ids.int(), "probs": t.probs.float()}, tmp)
        os.replace(tmp, path)    # atomic: a killed run never leaves a half-written target


@torch.no_grad()
def teacher_targets(verifier, window: list[int], prefix: int, top_k: int) -> Targets:
    """Full-cache verifier forward over the window; targets at the continuation positions."""
    ids = torch.tensor([window], device=verifier.device)                          # [1, P + C]
    cache = FullKVCache.for_model(verifier, ids.shape[1])
    verifier(ids[:, :prefix], cache, last_only=True)
    logits = verifier(ids[:, prefix:], cache)[0].float()                          # [C, V]
    probs, top = logits.softmax(-1).topk(top_k, dim=-1)                           # [C, K]
    return Targets(logits.argmax(-1).cpu(), top.cpu(), probs.cpu())


def ensure_targets(verifier, cache: TeacherCache, windows: list[list[int]], progress: bool = True,
                   desc: str = "teacher") -> None:
    """Compute (and store) the targets of every window not on disk yet."""
    todo = [w for w in windows if not cache.has(w)]
    if not todo:
        return
    from tqdm import tqdm
    for w in tqdm(todo, desc=desc, unit="window", disable=not progress, dynamic_ncols=True):
        cache.save(w, teacher_targets(verifier, w, cache.prefix, cache.top_k))
