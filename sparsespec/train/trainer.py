"""The BudgetDraft training loop: L_A (full-cache view) + lam * L_C (sparse views), one window a step.

Each step: the student prefills the window's prefix without gradient, seen through the full view
and one sparse view per sampled budget (sparsespec/train/views.py); the continuation is run with
gradient through each view and scored against the verifier's cached targets. AdamW, linear warmup
then cosine, gradient clipping. Window order and budgets are drawn from seeded generators keyed
by the step, so a resumed run takes exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from sparsespec.models import load_model
from sparsespec.train.cache import ContinuationCache
from sparsespec.train.checkpoint import checkpoints, load_state, save_checkpoint
from sparsespec.train.config import TrainConfig
from sparsespec.train.heldout import heldout_acceptance
from sparsespec.train.losses import acceptance, objective_loss
from sparsespec.train.prepare import Plan, load_student, load_verifier, make_trainable, trainable_parameters
from sparsespec.train.teacher import TeacherCache, ensure_targets, fingerprint
from sparsespec.train.views import prefix_views


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over cfg.warmup steps, then cosine down to lr * min_lr_ratio at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def window_index(cfg: TrainConfig, step: int, num_windows: int) -> int:
    """Epochs over the windows, each in its own seeded order."""
    epoch, i = divmod(step, num_windows)
    order = list(range(num_windows))
    random.Random(cfg.seed * 7919 + epoch).shuffle(order)
    return order[i]


def step_budgets(cfg: TrainConfig, step: int) -> list[int]:
    """The sparse views of this step: views_per_step budgets drawn from cfg.budgets."""
    if cfg.lam == 0:
        return []
    rng = random.Random(cfg.seed * 1_000_003 + step)
    return rng.choices(list(cfg.budgets), weights=list(cfg.budgets.values()), k=cfg.views_per_step)


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only (not norms or biases)."""
    params = trainable_parameters(model)
    groups = [{"params": [q for _, q in params if q.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [q for _, q in params if q.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, foreach=False)


class Trainer:
    def __init__(self, plan: Plan, out: Path, teacher_root: Path, progress: bool = True):
        self.plan, self.cfg = plan, plan.cfg
        self.out, self.progress = Path(out), progress
        self.teacher = TeacherCache(teacher_root, fingerprint(plan.verifier_dir), self.cfg.prefix,
                                    self.cfg.continuation, self.cfg.top_k)

    def prepare_targets(self) -> None:
        """Teacher targets for every training and held-out window not on disk yet."""
        windows = self.plan.heldout_windows + (self.plan.train_windows if self.cfg.objective != "lm" else [])
        if all(self.teacher.has(w) for w in windows):
            return
        verifier = load_verifier(self.plan)
        ensure_targets(verifier, self.teacher, windows, self.progress)
        del verifier

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict:
        """Train to cfg.steps (or stop after `stop_after` steps, checkpointed); returns a summary."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.prepare_targets()
        self.out.mkdir(parents=True, exist_ok=True)
        ignore = self.out / ".gitignore"
        if not ignore.exists():
            ignore.write_text("*\n")          # checkpoints are hundreds of MB: never committed by accident
        found = checkpoints(self.out) if resume else []
        if found:
            state = load_state(found[-1], cfg)
            model = make_trainable(load_model(found[-1], device=cfg.device), cfg.freeze_embeddings)
            opt = make_optimizer(model, cfg)
            opt.load_state_dict(state["optimizer"])
            start, history = state["step"], state["history"]
        else:
            model = load_student(self.plan)
            opt = make_optimizer(model, cfg)
            start, history = 0, [{"step": 0, "heldout": self._heldout(model)}]
        end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        t0 = time.perf_counter()
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.objective} lam={cfg.lam:g}",
                   unit="step", disable=not self.progress, dynamic_ncols=True)
        ema_loss = ema_acc = None
        for step in range(start, end):
            rec = self._step(model, opt, step)
            history.append(rec)
            ema_loss = rec["loss"] if ema_loss is None else 0.9 * ema_loss + 0.1 * rec["loss"]
            ema_acc = rec["accept"] if ema_acc is None else 0.9 * ema_acc + 0.1 * rec["accept"]
            bar.update(1)
            bar.set_postfix(loss=f"{ema_loss:.3f}", accept=f"{ema_acc:.3f}", lr=f"{rec['lr']:.1e}")
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                history.append({"step": done, "heldout": self._heldout(model)})
            if done == cfg.steps:
                history.append({"step": done, "heldout": self._heldout(model)})
            if done % cfg.save_every == 0 or done == end:
                save_checkpoint(self.out, done, model, self.plan.tokenizer, opt, cfg, history)
        bar.close()
        summary = {"config": cfg.to_dict(), "steps_done": end, "wall_s": round(time.perf_counter() - t0, 1),
                   "checkpoint": str(checkpoints(self.out)[-1]) if checkpoints(self.out) else None,
                   "history": history}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        self.model, self.optimizer = model, opt
        return summary

    def _heldout(self, model) -> dict:
        return heldout_acceptance(model, self.plan.heldout_windows, self.teacher, self.cfg.prefix,
                                  self.cfg.policy)

    def _step(self, model, opt, step: int) -> dict:
        cfg = self.cfg
        window = self.plan.train_windows[window_index(cfg, step, len(self.plan.train_windows))]
        ids = torch.tensor([window], device=model.device)                      # [1, P + C]
        cont = ids[:, cfg.prefix:]                                              # [1, C]
        targets = None if cfg.objective == "lm" else self.teacher.load(window).to(model.device)
        next_tokens = cont[0, 1:]                                               # [C - 1], lm only
        budgets = step_budgets(cfg, step)
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        views = prefix_views(model, ids[:, :cfg.prefix], [None, *budgets], cfg.policy)

        def branch(view, weight: float) -> tuple[float, float]:
            logits = model(cont, ContinuationCache(view))[0]                    # [C, V]
            loss = objective_loss(cfg.objective, logits, targets, next_tokens)
            (weight * loss).backward()
            acc = acceptance(logits.detach(), targets)[0] if targets is not None else \
                (logits[:-1].argmax(-1) == next_tokens).float().mean().item()
            return loss.item(), acc

        la, acc_full = branch(views[None], 1.0)
        lcs = [branch(views[b], cfg.lam / len(budgets)) for b in budgets]
        grad_norm = torch.nn.utils.clip_grad_norm_([q for _, q in trainable_parameters(model)], cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lc = sum(x for x, _ in lcs) / len(lcs) if lcs else 0.0
        acc = sum(a for _, a in lcs) / len(lcs) if lcs else acc_full
        return {"step": step + 1, "loss": la + cfg.lam * lc, "la": la, "lc": lc, "budgets": budgets,
                "accept": acc, "accept_full": acc_full, "grad_norm": float(grad_norm), "lr": lr}
