"""The acceptance study's outputs: JSON (every run and output), a markdown page, two plots."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

GUIDED, FULL = "verifier_guided", "full"


def command(args) -> str:
    parts = ["sparsespec bench acceptance", f"--model {args.model}", f"--contexts {args.contexts}",
             f"--budgets {args.budgets}", f"--policies {args.policies}", f"--drafters {args.drafters}",
             f"--sources {args.sources}", f"--prompts {args.prompts}", f"--heldout {args.heldout}",
             f"--max-tokens {args.max_tokens}", f"--temperatures {args.temperatures}",
             f"--threads {args.threads}", f"--out {args.out}"]
    if args.k is not None:
        parts.append(f"-k {args.k}")
    if args.append:
        parts.append("--append")
    return " ".join(parts)


def _key(r: dict) -> tuple:
    return (r["drafter"], r["temperature"], r["context"], r["source"], r["policy"], r["budget"])


def aggregate(runs: list[dict]) -> dict[tuple, dict]:
    """(drafter, T, context, source, policy, budget) -> tau/alpha median, min, max over prompts."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[_key(r)].append(r)
    out = {}
    for key, rs in groups.items():
        taus = [r["tau"] for r in rs]
        out[key] = {"tau": statistics.median(taus), "tau_min": min(taus), "tau_max": max(taus),
                    "alpha": statistics.median(r["alpha"] for r in rs), "runs": len(rs),
                    "k": statistics.median(r["k"] for r in rs),
                    "drafter_kv_device_bytes": max(r["drafter_kv_device_bytes"] for r in rs),
                    "equal": all(r.get("equal_to_ar") is not False for r in rs)}
    return out


def gap_closure(agg: dict[tuple, dict], budget: int) -> list[dict]:
    """Per (drafter, T, context, source): how much of the tau gap between the best non-guided
    policy and the full-cache drafter verifier_guided closes at `budget`."""
    rows = []
    cells = {k[:4] for k in agg}
    for cell in sorted(cells, key=str):
        full = agg.get(cell + (FULL, None))
        guided = agg.get(cell + (GUIDED, budget))
        others = {k[4]: v for k, v in agg.items() if k[:4] == cell and k[5] == budget and k[4] not in (GUIDED, FULL)}
        if not full or not guided or not others:
            continue
        best_name, best = max(others.items(), key=lambda kv: kv[1]["tau"])
        gap = full["tau"] - best["tau"]
        rows.append({"drafter": cell[0], "temperature": cell[1], "context": cell[2], "source": cell[3],
                     "budget": budget, "best_policy": best_name, "tau_best": best["tau"],
                     "tau_guided": guided["tau"], "tau_full": full["tau"], "gap": gap,
                     "closed": (guided["tau"] - best["tau"]) / gap if gap > 1e-9 else None})
    return rows


def _traffic(runs: list[dict]) -> dict:
    guided = [r for r in runs if r["policy"] == GUIDED and r["summary_bytes"]]
    if not guided:
        return {}
    ratios = [r["summary_bytes"] / r["drafter_full_kv_bytes"] for r in guided]
    overhead = [r["tracker_s"] / r["verify_s"] for r in guided if r["verify_s"] > 0]
    return {"summary_bytes_max": max(r["summary_bytes"] for r in guided),
            "summaries_per_run_median": statistics.median(r["summaries_sent"] for r in guided),
            "traffic_vs_full_kv_max": max(ratios),
            "tracker_overhead_median": statistics.median(overhead) if overhead else None,
            "tracker_overhead_max": max(overhead) if overhead else None}


def axes(runs: list[dict]) -> dict:
    """The grid the runs cover (several invocations may have been merged)."""
    def values(key, order=None):
        found = {r[key] for r in runs if r[key] is not None}
        return [x for x in order if x in found] + sorted(found - set(order)) if order else sorted(found)
    return {"contexts": values("context"), "budgets": values("budget"), "drafters": values("drafter", ["same"]),
            "temperatures": values("temperature"), "sources": values("source", ["kjv", "code", "retrieval"]),
            "policies": values("policy", ["streaming", "chunk_topk", "snapkv", GUIDED, FULL])}


def merge(previous: dict, result: dict) -> dict:
    """Add a run's results to an earlier one's (a later run of the same cell replaces it)."""
    key = lambda r: _key(r) + (r["document"],)   # noqa: E731
    runs = {key(r): r for r in previous["runs"]}
    runs.update({key(r): r for r in result["runs"]})
    out = dict(result)
    out["runs"] = list(runs.values())
    out["commands"] = previous.get("commands", [previous.get("command")]) + [result["command"]]
    out["k"] = {**previous.get("k", {}), **result["k"]}
    out["wall_s"] = round(previous.get("wall_s", 0) + result["wall_s"], 1)
    return out


def markdown(result: dict, agg: dict, gaps: list[dict]) -> str:
    runs = result["runs"]
    cfg = axes(runs)
    budgets = cfg["budgets"]
    greedy = [r for r in runs if r["temperature"] == 0]
    lines = ["# Acceptance study", "",
             "Generated by `sparsespec bench acceptance`; the reading of these numbers is in "
             "[summaries.md](summaries.md).", "",
             "Commands:", "", *[f"    {c}" for c in result.get("commands", [result["command"]])], "",
             f"Environment: {json.dumps(result['environment'])}; wall time {result['wall_s']} s.", "",
             f"k per drafter, chosen on held-out documents: {result['k']}.", "",
             f"Greedy runs equal to AR: **{sum(r.get('equal_to_ar') is True for r in greedy)} of {len(greedy)}**.", ""]
    t = _traffic(runs)
    if t:
        lines += [f"Summary traffic: at most {t['summary_bytes_max']} bytes per session "
                  f"({t['traffic_vs_full_kv_max']:.2e} of the drafter's full KV bytes); "
                  f"median {t['summaries_per_run_median']} summaries per session. "
                  f"Importance tracking costs {100 * t['tracker_overhead_median']:.1f}% of verify time "
                  f"(median; max {100 * t['tracker_overhead_max']:.1f}%).", ""]
    lines += ["## Gap closed by verifier_guided", "",
              "| drafter | T | context | source | B | best other | tau best | tau guided | tau full | gap closed |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for g in gaps:
        closed = (f"no gap (guided {g['tau_guided'] - g['tau_best']:+.2f})" if g["closed"] is None
                  else f"{100 * g['closed']:.0f}%")
        lines.append(f"| {g['drafter']} | {g['temperature']} | {g['context']} | {g['source']} | {g['budget']} | "
                     f"{g['best_policy']} | {g['tau_best']:.2f} | {g['tau_guided']:.2f} | {g['tau_full']:.2f} | {closed} |")
    lines += ["", "## tau by budget (median over prompts [min, max])", ""]
    for drafter in cfg["drafters"]:
        for temp in cfg["temperatures"]:
            lines += [f"### drafter {drafter}, temperature {temp}", "",
                      "| context | source | policy | " + " | ".join(f"B={b}" for b in budgets) + " | full |",
                      "|" + "---|" * (4 + len(budgets))]
            for context in cfg["contexts"]:
                for source in cfg["sources"]:
                    full = agg.get((drafter, temp, context, source, FULL, None))
                    for policy in [p for p in cfg["policies"] if p != FULL]:
                        cells = [_cell(agg.get((drafter, temp, context, source, policy, b))) for b in budgets]
                        lines.append(f"| {context} | {source} | {policy} | " + " | ".join(cells)
                                     + f" | {_cell(full)} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def _cell(a: dict | None) -> str:
    if a is None:
        return "-"
    spread = "" if a["tau_min"] == a["tau_max"] else f" [{a['tau_min']:.2f}, {a['tau_max']:.2f}]"
    return f"{a['tau']:.2f}{spread}" + ("" if a["equal"] else " DIFFERS")


def plots(result: dict, agg: dict, img: Path, budget: int) -> list[Path]:
    """tau vs context per policy (at `budget`) and tau vs budget per policy (largest context),
    greedy, one panel per drafter, median over sources and prompts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = axes(result["runs"])
    img.mkdir(parents=True, exist_ok=True)
    drafters, policies = cfg["drafters"], cfg["policies"]

    def tau(drafter, context, policy, b):
        vals = [v["tau"] for k, v in agg.items()
                if k[0] == drafter and k[1] == 0.0 and k[2] == context and k[4] == policy
                and k[5] == (None if policy == FULL else b)]
        return statistics.median(vals) if vals else None

    out = []
    for name, xs, xlabel, fixed in (("tau_vs_context", cfg["contexts"], "context (tokens)", budget),
                                    ("tau_vs_budget", cfg["budgets"], "drafter KV budget B", max(cfg["contexts"]))):
        fig, panels = plt.subplots(1, len(drafters), figsize=(5.5 * len(drafters), 4), squeeze=False)
        for ax, drafter in zip(panels[0], drafters):
            for policy in policies:
                if name == "tau_vs_context":
                    ys = [tau(drafter, x, policy, fixed) for x in xs]
                else:
                    ys = [tau(drafter, fixed, policy, x) for x in xs]
                pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
                if pts:
                    style = dict(linewidth=2.5) if policy == GUIDED else dict(linestyle="--" if policy == FULL else "-")
                    ax.plot(*zip(*pts), marker="o", label=policy, **style)
            title = f"B = {fixed}" if name == "tau_vs_context" else f"context {fixed}"
            ax.set(title=f"drafter {drafter}, {title}, greedy", xlabel=xlabel, ylabel="tau")
            if name == "tau_vs_budget":
                ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = img / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def write(out: Path, result: dict, budget: int = 256, append: bool = False) -> None:
    path = out / "bench" / "acceptance.json"
    if append and path.exists():
        result = merge(json.loads(path.read_text()), result)
    agg = aggregate(result["runs"])
    budgets = axes(result["runs"])["budgets"]
    gaps = [g for b in budgets for g in gap_closure(agg, b)]
    result["gap_closure"] = gaps
    result["traffic"] = _traffic(result["runs"])
    (out / "bench").mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    (out / "acceptance.md").write_text(markdown(result, agg, gaps))
    plots(result, agg, out / "img", budget if budget in budgets else budgets[0])
    print(f"wrote {out / 'acceptance.md'}, {out / 'bench' / 'acceptance.json'}, {out / 'img'}/tau_vs_*.png")
