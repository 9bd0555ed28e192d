"""Aggregate benchmark runs (median and spread over prompts) and write JSON + markdown.

docs/benchmarks.md holds several benchmarks; this one owns the text between its two markers and
leaves the rest of the file alone.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from sparsespec.report import human_bytes

BEGIN, END = "<!-- engine-bench:begin -->", "<!-- engine-bench:end -->"


def first_divergence(tokens: list[int], reference: list[int] | None) -> int | None:
    """The first index where tokens differ from the reference (None when equal or no reference)."""
    if reference is None or tokens == reference:
        return None
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    return min(len(tokens), len(reference))


def median_spread(values: list[float]) -> str:
    """'median [min, max]' (just the value when all agree)."""
    med, lo, hi = statistics.median(values), min(values), max(values)
    return f"{med:.2f}" if lo == hi else f"{med:.2f} [{lo:.2f}, {hi:.2f}]"


def progress_line(run: dict) -> str:
    tau = f" tau {run['tau']:.2f} alpha {run['alpha']:.2f}" if "tau" in run else ""
    same = "equal" if run["equal_to_ar"] else f"DIFFERS at {run['first_divergence']}"
    return (f"[{run['context']:>5} #{run['prompt']}] {run['variant']:<40} "
            f"{run['tokens_per_s']:7.2f} tok/s{tau}  {same}")


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (context, variant): tokens/s median and spread, speedup over our AR per prompt."""
    ar = {(r["context"], r["prompt"]): r["tokens_per_s"] for r in runs if r["system"] == "ours-ar"}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["context"], r["variant"])].append(r)
    rows = []
    for (context, variant), rs in groups.items():
        tps = [r["tokens_per_s"] for r in rs]
        speedups = [r["tokens_per_s"] / ar[(context, r["prompt"])] for r in rs
                    if ar.get((context, r["prompt"]))]
        row = {"context": context, "variant": variant, "system": rs[0]["system"], "runs": len(rs),
               "tokens_per_s": tps, "speedup_vs_ar": speedups,
               "all_equal_to_ar": all(r["equal_to_ar"] for r in rs)}
        for key in ("tau", "alpha", "k", "drafter_kv_device_bytes", "drafter_kv_host_bytes",
                    "verifier_kv_bytes"):
            if key in rs[0]:
                row[key] = statistics.median(r[key] for r in rs)
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| context | system | tok/s median [min, max] | vs our AR | tau | alpha | k | "
            "drafter KV device | verifier KV | output = our AR |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        spec = r["system"] == "ours-spec"
        lines.append("| " + " | ".join([
            str(r["context"]), r["variant"], median_spread(r["tokens_per_s"]),
            f"{statistics.median(r['speedup_vs_ar']):.2f}x" if r["speedup_vs_ar"] else "-",
            f"{r['tau']:.2f}" if spec else "-", f"{r['alpha']:.2f}" if spec else "-",
            f"{r['k']:.1f}" if spec else "-",
            human_bytes(r["drafter_kv_device_bytes"]) if spec else "-",
            human_bytes(r["verifier_kv_bytes"]) if "verifier_kv_bytes" in r else "-",
            "yes" if r["all_equal_to_ar"] else "**no**"]) + " |")
    return "\n".join(lines)


def write(out_dir, runs: list[dict], rows: list[dict], env: dict, command: str) -> Path:
    out = Path(out_dir)
    (out / "bench").mkdir(parents=True, exist_ok=True)
    data = {"command": command, "environment": env, "summary": rows, "runs": runs}
    (out / "bench" / "engine.json").write_text(json.dumps(data, indent=1) + "\n")
    section = "\n".join([
        BEGIN,
        "## Engine: AR vs speculative vs transformers (greedy, one process, same prompts)",
        "",
        f"Command: `{command}`",
        "",
        f"Environment: {env['date']}, {env['cpu']}, {env['threads']} threads, torch {env['torch']}, "
        f"transformers {env['transformers']}, {env['device']} {env['dtype']}, model {env['model']}; "
        f"{env['prompts_per_context']} King James Bible prompts per context, {env['max_tokens']} new "
        "tokens each. Decode tokens/s excludes the prefill. Every output is in `bench/engine.json`.",
        "",
        markdown_table(rows),
        END,
    ])
    return replace_section(out / "benchmarks.md", BEGIN, END, section)


def replace_section(md: Path, begin: str, end: str, section: str) -> Path:
    """Put `section` (which starts with `begin` and ends with `end`) into the markdown file,
    replacing the previous one; the rest of the file is left alone."""
    text = md.read_text() if md.exists() else "# Benchmarks\n\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    md.write_text(text)
    return md
