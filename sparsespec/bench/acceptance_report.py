"""The acceptance study's outputs: JSON (every run and output), a markdown page, two plots, and
the generated table of docs/summaries.md.

A cell is (drafter, temperature, context, policy, budget), pooled over the prompts of every
source (2 per source by default: n = 6); tau is reported as mean, sample std, min, max and n.
Per-source figures (n = 2 by default) are in the page too, for the retrieval prompts above all.
The "informed" policy of a drafter is what the verifier tells it: `fed` for a drafter it feeds,
`verifier_guided` (KV summaries) for one it cannot; the gap it closes is measured against the
best of the drafter's own policies (streaming, chunk_topk, snapkv) and the full cache.

`python -m sparsespec.bench.acceptance_report OUT` renders everything again from
OUT/bench/acceptance.json (no model is loaded).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

FED, GUIDED, FULL = "fed", "verifier_guided", "full"
OWN = ("streaming", "chunk_topk", "snapkv")
POLICY_ORDER = ["streaming", "chunk_topk", "snapkv", FED, GUIDED, FULL]
TABLE_BEGIN, TABLE_END = "<!-- acceptance-table:begin -->", "<!-- acceptance-table:end -->"


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
    """A run's per-source cell."""
    return (r["drafter"], r["temperature"], r["context"], r["source"], r["policy"], r["budget"])


def _cell(r: dict) -> tuple:
    """A run's cell, pooled over sources."""
    return (r["drafter"], r["temperature"], r["context"], r["policy"], r["budget"])


def spread(values: list[float]) -> dict:
    """mean, sample std (0 for one value), min, max, n."""
    n = len(values)
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if n > 1 else 0.0,
            "min": min(values), "max": max(values), "n": n}


def aggregate(runs: list[dict], key=_cell) -> dict[tuple, dict]:
    """cell -> tau/alpha spread over its prompts, plus what every run of it must satisfy."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[key(r)].append(r)
    out = {}
    for k, rs in groups.items():
        tau = spread([r["tau"] for r in rs])
        out[k] = {"tau": tau["mean"], "tau_std": tau["std"], "tau_min": tau["min"], "tau_max": tau["max"],
                  "n": tau["n"], "alpha": statistics.fmean(r["alpha"] for r in rs),
                  "k": statistics.median(r["k"] for r in rs),
                  "drafter_kv_device_bytes": max(r["drafter_kv_device_bytes"] for r in rs),
                  "drafter_kv_host_bytes": max(r["drafter_kv_host_bytes"] for r in rs),
                  "equal": all(r.get("equal_to_ar") is not False for r in rs),
                  "checked": sum(r.get("equal_to_ar") is not None for r in rs),
                  "problems": sum(bool(r.get("problem")) for r in rs)}
    return out


def informed_policy(agg: dict, drafter: str) -> str | None:
    """What the verifier tells this drafter in these results: fed, else verifier_guided."""
    have = {k[-2] for k in agg if k[0] == drafter}
    return FED if FED in have else GUIDED if GUIDED in have else None


def gap_closure(agg: dict[tuple, dict], budget: int) -> list[dict]:
    """Per (drafter, T, context[, source]) at `budget`: how much of the tau gap between the best
    own policy and the full-cache drafter the informed policy closes. `below_best`: the informed
    mean is below the best own mean by more than both spreads (std)."""
    rows = []
    for head in sorted({k[:-2] for k in agg}, key=str):
        informed = informed_policy(agg, head[0])
        full, inf = agg.get(head + (FULL, None)), agg.get(head + (informed, budget))
        own = {p: agg[head + (p, budget)] for p in OWN if head + (p, budget) in agg}
        if not full or not inf or not own:
            continue
        best_name, best = max(own.items(), key=lambda kv: kv[1]["tau"])
        gap = full["tau"] - best["tau"]
        row = {"drafter": head[0], "temperature": head[1], "context": head[2], "budget": budget,
               "informed": informed, "best_policy": best_name, "tau_best": best["tau"],
               "tau_best_std": best["tau_std"], "tau_informed": inf["tau"], "tau_informed_std": inf["tau_std"],
               "tau_full": full["tau"], "gap": gap, "n": inf["n"],
               "closed": (inf["tau"] - best["tau"]) / gap if gap > 1e-9 else None,
               "below_best": inf["tau"] < best["tau"] - best["tau_std"] - inf["tau_std"]}
        if len(head) == 4:
            row["source"] = head[3]
        rows.append(row)
    return rows


def _traffic(runs: list[dict]) -> dict:
    out = {}
    guided = [r for r in runs if r["policy"] == GUIDED and r["summary_bytes"]]
    if guided:
        overhead = [r["tracker_s"] / r["verify_s"] for r in guided if r["verify_s"] > 0]
        out.update({"summary_bytes_max": max(r["summary_bytes"] for r in guided),
                    "summaries_per_run_median": statistics.median(r["summaries_sent"] for r in guided),
                    "traffic_vs_full_kv_max": max(r["summary_bytes"] / r["drafter_full_kv_bytes"] for r in guided),
                    "tracker_overhead_median": statistics.median(overhead) if overhead else None,
                    "tracker_overhead_max": max(overhead) if overhead else None})
    fed = [r for r in runs if r["policy"] == FED and r["feeds_sent"]]
    if fed:
        out.update({"feed_bytes_per_session_median": statistics.median(r["feed_bytes"] for r in fed),
                    "feed_bytes_per_session_max": max(r["feed_bytes"] for r in fed),
                    "feeds_per_session_median": statistics.median(r["feeds_sent"] for r in fed),
                    "feed_vs_full_kv_max": max(r["feed_bytes"] / r["drafter_full_kv_bytes"] for r in fed),
                    "fed_host_bytes_max": max(r["drafter_kv_host_bytes"] for r in fed)})
        if all("feed_open_bytes" in r for r in fed):     # runs recorded before the breakdown lack it
            def med(values):
                values = list(values)
                return statistics.median(values) if values else None
            out.update({
                "feed_open_bytes_median": med(r["feed_open_bytes"] for r in fed),
                "feed_block_bytes_per_round_median": med(r["feed_block_bytes"] / r["feed_blocks"]
                                                         for r in fed if r["feed_blocks"]),
                "feed_refresh_bytes_median": med(r["feed_refresh_bytes"] / r["feed_refreshes"]
                                                 for r in fed if r["feed_refreshes"]),
                "feed_refreshes_per_session_median": med(r["feed_refreshes"] for r in fed),
                "feed_time_share_median": med(r["feed_s"] / r["decode_s"] for r in fed if r["decode_s"] > 0),
                "feed_time_share_max": max((r["feed_s"] / r["decode_s"] for r in fed if r["decode_s"] > 0),
                                           default=None)})
    return out


def axes(runs: list[dict]) -> dict:
    """The grid the runs cover (several invocations may have been merged)."""
    def values(key, order=None):
        found = {r[key] for r in runs if r[key] is not None}
        return [x for x in order if x in found] + sorted(found - set(order)) if order else sorted(found)
    return {"contexts": values("context"), "budgets": values("budget"), "drafters": values("drafter", ["same"]),
            "temperatures": values("temperature"), "sources": values("source", ["kjv", "code", "retrieval"]),
            "policies": values("policy", POLICY_ORDER)}


def merge(previous: dict, result: dict) -> dict:
    """Add a run's results to an earlier one's (a later run of the same cell replaces it)."""
    key = lambda r: _key(r) + (r["document"],)   # noqa: E731
    runs = {key(r): r for r in previous["runs"]}
    runs.update({key(r): r for r in result["runs"]})
    out = dict(result)
    out["runs"] = list(runs.values())
    out["commands"] = previous.get("commands", [previous.get("command")]) + [result["command"]]
    out["k"] = {**previous.get("k", {}), **result["k"]}
    out["prompts"] = previous.get("prompts", []) + result.get("prompts", [])
    out["wall_s"] = round(previous.get("wall_s", 0) + result["wall_s"], 1)
    return out


def _tau(a: dict | None, *, std: bool = True) -> str:
    """'mean ± std' (or 'mean [min, max]'), with DIFFERS / PROBLEM flags; '-' for no runs."""
    if a is None:
        return "-"
    if std:
        text = f"{a['tau']:.2f} ± {a['tau_std']:.2f}"
    else:
        text = f"{a['tau']:.2f}" + ("" if a["tau_min"] == a["tau_max"] else f" [{a['tau_min']:.2f}, {a['tau_max']:.2f}]")
    return text + ("" if a["equal"] else " DIFFERS") + (" PROBLEM" if a["problems"] else "")


def _closed(g: dict) -> str:
    if g["closed"] is None:
        return f"no gap ({g['tau_informed'] - g['tau_best']:+.2f})"
    return f"{100 * g['closed']:.0f}%" + (" (below best)" if g["below_best"] else "")


def tau_table(agg: dict, cfg: dict, drafter: str, temperature: float, std: bool = True) -> list[str]:
    """Rows (context, policy), columns the budgets and the full cache: tau mean ± std with the
    prompt count (std), or mean [min, max] (a per-source table, where n is small)."""
    budgets = cfg["budgets"]
    lines = ["| context | policy | " + " | ".join(f"B={b}" for b in budgets) + " | full |" + (" n |" if std else ""),
             "|" + "---|" * (3 + len(budgets) + std)]
    for context in cfg["contexts"]:
        full = agg.get((drafter, temperature, context, FULL, None))
        for policy in [p for p in cfg["policies"] if p != FULL]:
            cells = [agg.get((drafter, temperature, context, policy, b)) for b in budgets]
            if not any(cells):
                continue
            row = f"| {context} | {policy} | " + " | ".join(_tau(c, std=std) for c in cells) + f" | {_tau(full, std=std)} |"
            if std:
                row += f" {max([c['n'] for c in cells if c] + [full['n'] if full else 0])} |"
            lines.append(row)
    return lines


def gap_table(gaps: list[dict]) -> list[str]:
    lines = ["| drafter | T | context | B | informed | best own | tau best | tau informed | tau full | gap closed | n |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in sorted(gaps, key=lambda g: (g["drafter"], g["temperature"], g.get("source", ""), g["context"], g["budget"])):
        where = f"{g['context']}" + (f" {g['source']}" if "source" in g else "")
        lines.append(f"| {g['drafter']} | {g['temperature']} | {where} | {g['budget']} | {g['informed']} | "
                     f"{g['best_policy']} | {g['tau_best']:.2f} ± {g['tau_best_std']:.2f} | "
                     f"{g['tau_informed']:.2f} ± {g['tau_informed_std']:.2f} | {g['tau_full']:.2f} | "
                     f"{_closed(g)} | {g['n']} |")
    return lines


def _count_line(runs: list[dict]) -> str:
    greedy = [r for r in runs if r["temperature"] == 0]
    equal = sum(r.get("equal_to_ar") is True for r in greedy)
    fed = [r for r in greedy if r["policy"] == FED]
    problems = sum(bool(r.get("problem")) for r in runs)
    return (f"Greedy runs equal to AR: **{equal} of {len(greedy)}** (fed: {sum(r.get('equal_to_ar') is True for r in fed)} "
            f"of {len(fed)}); runs that did not run as configured: {problems}.")


def markdown(result: dict, agg: dict, by_source: dict, gaps: list[dict], source_gaps: list[dict]) -> str:
    runs = result["runs"]
    cfg = axes(runs)
    lines = ["# Acceptance study", "",
             "Generated by `sparsespec bench acceptance` from [bench/acceptance.json](bench/acceptance.json); "
             "the reading of these numbers is in [summaries.md](summaries.md).", "",
             "Commands:", "", *[f"    {c}" for c in result.get("commands", [result["command"]])], "",
             f"Environment: {json.dumps(result['environment'])}; wall time {result['wall_s']} s.", "",
             f"k per drafter, chosen on held-out documents: {result['k']}.", "",
             _count_line(runs), ""]
    t = result.get("traffic") or _traffic(runs)
    if "feed_bytes_per_session_median" in t:
        lines += [f"Feed traffic (fed drafters): median {t['feed_bytes_per_session_median']:.0f} bytes per session "
                  f"(max {t['feed_bytes_per_session_max']}, {t['feed_vs_full_kv_max']:.2e} of the drafter's full KV "
                  f"bytes at most), median {t['feeds_per_session_median']} feeds per session; drafter host "
                  f"bytes at most {t['fed_host_bytes_max']}.", ""]
    if t.get("feed_open_bytes_median") is not None:
        def mb(x):
            return "-" if x is None else f"{x / 1e6:.2f} MB"

        def pct(x):
            return "-" if x is None else f"{100 * x:.1f}%"
        lines += [f"Feed traffic by kind (medians over fed sessions): the first selection {mb(t['feed_open_bytes_median'])}; "
                  f"a round's committed K/V {mb(t['feed_block_bytes_per_round_median'])}; a re-selection "
                  f"{mb(t['feed_refresh_bytes_median'])} ({t['feed_refreshes_per_session_median']} per session); "
                  f"making feeds takes {pct(t['feed_time_share_median'])} of decode time "
                  f"(max {pct(t['feed_time_share_max'])}).", ""]
    if "summary_bytes_max" in t:
        lines += [f"Summary traffic (verifier_guided): at most {t['summary_bytes_max']} bytes per session "
                  f"({t['traffic_vs_full_kv_max']:.2e} of the drafter's full KV bytes); "
                  f"median {t['summaries_per_run_median']} summaries per session."
                  + ("" if t["tracker_overhead_median"] is None else
                     f" Importance tracking costs {100 * t['tracker_overhead_median']:.1f}% of verify time "
                     f"(median; max {100 * t['tracker_overhead_max']:.1f}%)."), ""]
    lines += ["## Gap closed by the informed policy (pooled over sources)", "",
              "Gap: tau of the full-cache drafter minus the best own policy's (streaming, chunk_topk, snapkv) "
              "at the same budget; closed: the informed policy's share of it (mean over prompts). "
              "\"below best\": below the best own policy by more than both std.", "",
              *gap_table(gaps), "", "## Gap closed, per source", "", *gap_table(source_gaps), ""]
    for drafter in cfg["drafters"]:
        for temp in cfg["temperatures"]:
            lines += [f"## tau, drafter {drafter}, temperature {temp} (mean ± std over prompts)", "",
                      *tau_table(agg, cfg, drafter, temp), ""]
            for source in cfg["sources"]:
                src = {k[:3] + k[4:]: v for k, v in by_source.items() if k[3] == source}
                lines += [f"### {source} only (mean [min, max])", "", *tau_table(src, cfg, drafter, temp, std=False), ""]
    lines += ["## Cost", "", *cost_lines(result), ""]
    return "\n".join(lines) + "\n"


def cost_lines(result: dict) -> list[str]:
    """Seconds per prompt (prefill + AR + every configuration) and per configuration, per context."""
    by_context: dict[int, list[float]] = defaultdict(list)
    for p in result.get("prompts", []):
        by_context[p["context"]].append(p["wall_s"])
    configs: dict[tuple, list[float]] = defaultdict(list)
    for r in result["runs"]:
        if "wall_s" in r:
            configs[(r["context"], r["policy"] == FULL)].append(r["wall_s"])
    lines = ["| context | prompts | s per prompt (all its configurations) | s per sparse config | s per full config |",
             "|---|---|---|---|---|"]
    for context in sorted(by_context):
        sparse, full = configs.get((context, False), []), configs.get((context, True), [])
        lines.append(f"| {context} | {len(by_context[context])} | {statistics.fmean(by_context[context]):.1f} | "
                     f"{statistics.fmean(sparse) if sparse else math.nan:.1f} | "
                     f"{statistics.fmean(full) if full else math.nan:.1f} |")
    if "heldout_s" in result:
        lines.append(f"\nChoosing k on the held-out prompts: {result['heldout_s']} s.")
    return lines


def summary_table(result: dict, agg: dict, gaps: list[dict], source_gaps: list[dict]) -> str:
    """What docs/summaries.md shows between its markers: the greedy tau table of every drafter
    and the gap closed (pooled, and on the retrieval prompts), all from the JSON."""
    runs = result["runs"]
    cfg = axes(runs)
    greedy = [g for g in gaps if g["temperature"] == 0]
    retrieval = [g for g in source_gaps if g["temperature"] == 0 and g["source"] == "retrieval"]
    lines = [f"Generated from [bench/acceptance.json](bench/acceptance.json) by `sparsespec bench acceptance` "
             f"({result['environment']['date']}; k per drafter {result['k']}). {_count_line(runs)}", ""]
    for drafter in cfg["drafters"]:
        if 0.0 in cfg["temperatures"]:
            per = result.get("config", {}).get("prompts")
            lines += [f"tau, drafter {drafter}, greedy (mean ± std over n prompts"
                      + (f", {per} per source" if per else "") + "):", "",
                      *tau_table(agg, cfg, drafter, 0.0), ""]
    lines += ["Gap closed by the informed policy (fed / verifier_guided), greedy, pooled over sources:", "",
              *gap_table(greedy), "", "The same on the retrieval prompts alone:", "", *gap_table(retrieval)]
    return "\n".join(lines) + "\n"


def write_summary_table(path: Path, text: str) -> bool:
    """Replace what lies between the markers of `path` (False: no such file or markers)."""
    if not path.exists():
        return False
    page = path.read_text()
    if TABLE_BEGIN not in page or TABLE_END not in page:
        return False
    head, rest = page.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    path.write_text(f"{head}{TABLE_BEGIN}\n{text}{TABLE_END}{tail}")
    return True


def plots(result: dict, agg: dict, img: Path) -> list[Path]:
    """Greedy, mean ± std over prompts (pooled over sources): tau vs context per policy, one
    panel per (drafter, budget); tau vs budget per policy at the largest context, one panel per
    drafter. Titles name drafters by their labels, never by a path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = axes(result["runs"])
    img.mkdir(parents=True, exist_ok=True)
    drafters, policies, budgets = cfg["drafters"], cfg["policies"], cfg["budgets"]

    def series(drafter, policy, points):
        """[(x, mean, std)] over points = [(x, context, budget)]."""
        out = []
        for x, context, b in points:
            a = agg.get((drafter, 0.0, context, policy, None if policy == FULL else b))
            if a is not None:
                out.append((x, a["tau"], a["tau_std"]))
        return out

    def draw(ax, drafter, points):
        for policy in policies:
            pts = series(drafter, policy, points)
            if not pts:
                continue
            style = (dict(linewidth=2.5) if policy in (FED, GUIDED)
                     else dict(linestyle="--") if policy == FULL else dict(linewidth=1.2))
            color = f"C{POLICY_ORDER.index(policy)}" if policy in POLICY_ORDER else None   # same in every plot
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=policy, color=color, **style)
        ax.grid(alpha=0.3)
        ax.set_ylabel("tau (tokens per verify)")

    out = []
    fig, panels = plt.subplots(len(drafters), len(budgets), figsize=(4.6 * len(budgets), 3.8 * len(drafters)),
                               squeeze=False)
    for row, drafter in zip(panels, drafters):
        for ax, b in zip(row, budgets):
            draw(ax, drafter, [(c, c, b) for c in cfg["contexts"]])
            ax.set(title=f"drafter {drafter}, B = {b}", xlabel="context (tokens)")
            ax.set_xticks(cfg["contexts"])
    panels[0][0].legend(fontsize=8)
    fig.suptitle("tau vs context, greedy (mean ± std over prompts)")
    fig.tight_layout()
    out.append(img / "tau_vs_context.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)

    context = max(cfg["contexts"])
    fig, panels = plt.subplots(1, len(drafters), figsize=(5.5 * len(drafters), 4), squeeze=False)
    for ax, drafter in zip(panels[0], drafters):
        draw(ax, drafter, [(b, context, b) for b in budgets])
        ax.set(title=f"drafter {drafter}, context {context}", xlabel="drafter KV budget B")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.legend(fontsize=8)
    fig.suptitle("tau vs budget, greedy (mean ± std over prompts; full: no budget)")
    fig.tight_layout()
    out.append(img / "tau_vs_budget.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    return out


def family_plot(results: dict[str, dict], path: Path) -> Path:
    """tau vs context over two (or more) model families' studies in one figure: one panel per
    budget they share, a colour per policy, a line style per family (mean ± std over prompts,
    greedy, the first drafter of each study)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aggs = {name: (aggregate(r["runs"]), axes(r["runs"])) for name, r in results.items()}
    budgets = sorted(set.intersection(*(set(a[1]["budgets"]) for a in aggs.values())))
    policies = [p for p in POLICY_ORDER if any(p in a[1]["policies"] for a in aggs.values())]
    styles = ["-", "--", ":", "-."]
    fig, panels = plt.subplots(1, len(budgets), figsize=(4.8 * len(budgets), 4), squeeze=False)
    contexts = sorted({c for a in aggs.values() for c in a[1]["contexts"]})
    for ax, b in zip(panels[0], budgets):
        for (name, (agg, cfg)), style in zip(aggs.items(), styles):
            drafter = cfg["drafters"][0]
            for policy in policies:
                pts = [(c, agg[k]["tau"], agg[k]["tau_std"]) for c in cfg["contexts"]
                       for k in [(drafter, 0.0, c, policy, None if policy == FULL else b)] if k in agg]
                if pts:
                    xs, ys, es = zip(*pts)
                    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, linestyle=style,
                                color=f"C{POLICY_ORDER.index(policy)}",
                                label=f"{name} {policy} (k={results[name]['k'][drafter]})")
        ax.set(title=f"B = {b}", xlabel="context (tokens)", ylabel="tau (tokens per verify)")
        ax.set_xscale("log", base=2)
        ticks = [c for i, c in enumerate(contexts) if i == 0 or c > 1.1 * contexts[i - 1]]  # 8000 ~ 8192
        ax.set_xticks(ticks, [f"{round(c / 1024)}K" for c in ticks])
        ax.grid(alpha=0.3)
    handles, labels = panels[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(policies), fontsize=8)
    fig.suptitle("tau vs context on two model families, greedy (mean ± std over prompts)")
    fig.tight_layout(rect=(0, 0.05 * len(aggs) + 0.02, 1, 1))  # room for the legend below
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(out: Path, result: dict) -> None:
    """Everything but the JSON's runs, from the runs."""
    runs = result["runs"]
    agg, by_source = aggregate(runs), aggregate(runs, _key)
    budgets = axes(runs)["budgets"]
    gaps = [g for b in budgets for g in gap_closure(agg, b)]
    source_gaps = [g for b in budgets for g in gap_closure(by_source, b)]
    result["gap_closure"], result["gap_closure_by_source"] = gaps, source_gaps
    result["traffic"] = _traffic(runs)
    (out / "bench").mkdir(parents=True, exist_ok=True)
    (out / "bench" / "acceptance.json").write_text(json.dumps(result, indent=1))
    (out / "acceptance.md").write_text(markdown(result, agg, by_source, gaps, source_gaps))
    plots(result, agg, out / "img")
    table = write_summary_table(out / "summaries.md", summary_table(result, agg, gaps, source_gaps))
    print(f"wrote {out / 'acceptance.md'}, {out / 'bench' / 'acceptance.json'}, {out / 'img'}/tau_vs_*.png"
          + (f", the table in {out / 'summaries.md'}" if table else ""))


def write(out: Path, result: dict, append: bool = False) -> None:
    path = out / "bench" / "acceptance.json"
    if append and path.exists():
        result = merge(json.loads(path.read_text()), result)
    render(out, result)


def _load(where: Path) -> dict:
    return json.loads((where / "bench" / "acceptance.json").read_text())


if __name__ == "__main__":
    # OUT: render OUT again from its JSON. --families PNG LABEL=OUT LABEL=OUT ...: one tau-vs-context
    # figure over several studies (e.g. SmolLM2 2K-8K and Gemma 3 4K-16K).
    if len(sys.argv) > 2 and sys.argv[1] == "--families":
        studies = {label: _load(Path(where)) for label, where in (a.split("=", 1) for a in sys.argv[3:])}
        print(f"wrote {family_plot(studies, Path(sys.argv[2]))}")
    else:
        where = Path(sys.argv[1] if len(sys.argv) > 1 else "docs")
        render(where, _load(where))
