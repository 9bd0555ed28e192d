"""Checkpoints: a Hugging Face directory (what `--drafter DIR` loads) plus the trainer's state.

checkpoint-<step>/ holds config.json, model.safetensors and the tokenizer files, so it serves as a
drafter as is, and trainer_state.pt (step, optimizer, history) and train_config.json for resume.
A checkpoint is written to a temporary name and renamed, so a killed run leaves the previous one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from sparsespec.errors import InvalidArgument
from sparsespec.models.loader import save_model
from sparsespec.train.config import TrainConfig

STATE = "trainer_state.pt"
CONFIG = "train_config.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def save_checkpoint(out: Path, step: int, model, tokenizer, optimizer, cfg: TrainConfig,
                    history: list[dict], keep: int = 1) -> Path:
    out = Path(out)
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, tokenizer)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "history": history}, tmp / STATE)
    (tmp / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(out: Path) -> list[Path]:
    """checkpoint-<step> directories under out, oldest first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NAME.match(p.name)) and (p / STATE).is_file()]
    return [p for _, p in sorted(found)]


def load_state(ckpt: Path, cfg: TrainConfig) -> dict:
    """The trainer state of a checkpoint, refusing one written under a different config."""
    saved = TrainConfig.from_dict(json.loads((Path(ckpt) / CONFIG).read_text()))
    ignore = {"threads", "save_every", "eval_every", "device"}     # may change between sessions
    diff = [k for k, v in cfg.to_dict().items() if k not in ignore and saved.to_dict()[k] != v]
    if diff:
        raise InvalidArgument(diff[0], f"differs from the checkpoint's ({saved.to_dict()[diff[0]]!r}); "
                                       "resume needs the same config")
    return torch.load(Path(ckpt) / STATE, weights_only=True)

