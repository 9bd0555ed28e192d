"""Markdown tables for docs/training.md, rendered from the saved JSON (never typed by hand)."""

from __future__ import annotations

import json
from pathlib import Path

from sparsespec.train.heldout import budget_name, EVAL_BUDGETS

BUDGETS = [budget_name(b) for b in EVAL_BUDGETS]


def spec_table(result: dict) -> str:
    """alpha / tau per budget per variant, from `sparsespec train eval` JSON."""
    head = "| drafter | " + " | ".join(f"B={b}" for b in BUDGETS) + " | SD == AR |"
    lines = [head, "|" + "---|" * (len(BUDGETS) + 2)]
    for variant, cells in result["cells"].items():
        row = [f"{cells[b]['alpha']:.3f} / {cells[b]['tau']:.2f}" for b in BUDGETS]
        ok = all(c["sd_equals_ar"] for c in cells.values())
        runs = sum(c["runs"] for c in cells.values())
        lines.append(f"| {variant} | " + " | ".join(row) + f" | {'yes' if ok else 'NO'} ({runs} runs) |")
    return "\n".join(lines)


def heldout_table(summaries: dict[str, dict], key: str) -> str:
    """Teacher-forced held-out acceptance (`key`: greedy | sampling) per budget; the untrained row
    is step 0 of the first run (every run starts from the same drafter)."""
    lines = ["| drafter | " + " | ".join(f"B={b}" for b in BUDGETS) + " |", "|" + "---|" * (len(BUDGETS) + 1)]
    rows = []
    for i, (name, s) in enumerate(summaries.items()):
        evals = [h for h in s["history"] if "heldout" in h]
        if i == 0 and evals[0]["step"] == 0:
            rows.append(("untrained", evals[0]["heldout"]))
        rows.append((name, evals[-1]["heldout"]))
    for name, h in rows:
        lines.append(f"| {name} | " + " | ".join(f"{h[b][key]:.3f}" for b in BUDGETS) + " |")
    return "\n".join(lines)


def runs_table(summaries: dict[str, dict]) -> str:
    lines = ["| run | objective | lam | steps | wall (min) | loss, first 20 steps | loss, last 20 steps |",
             "|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        c = s["config"]
        losses = [h["loss"] for h in s["history"] if "loss" in h]
        first, last = losses[:20], losses[-20:]
        lines.append(f"| {name} | {c['objective']} | {c['lam']:g} | {s['steps_done']} | {s['wall_s'] / 60:.1f} | "
                     f"{sum(first) / len(first):.3f} | {sum(last) / len(last):.3f} |")
    return "\n".join(lines)


def render(eval_path: Path | None, summary_paths: list[Path]) -> str:
    summaries = {p.stem.removeprefix("summary_"): json.loads(p.read_text()) for p in summary_paths}
    parts = []
    if summaries:
        parts += ["Training runs:", "", runs_table(summaries), "",
                  "Held-out teacher-forced greedy acceptance (argmax agreement with the verifier):", "",
                  heldout_table(summaries, "greedy"), "",
                  "Held-out teacher-forced sampling acceptance (sum over the verifier's top-32 of min(p, q)):", "",
                  heldout_table(summaries, "sampling"), ""]
    if eval_path is not None:
        r = json.loads(Path(eval_path).read_text())
        parts += [f"Speculative decoding, greedy, k = {r['k']}, {len(r['prompts'])} held-out prompts of "
                  f"{r['context']} tokens, {r['max_tokens']} new tokens each; alpha / tau (pooled):", "",
                  spec_table(r), ""]
    return "\n".join(parts)
