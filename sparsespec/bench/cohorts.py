"""`sparsespec bench cohorts`: overlapped rounds (--cohorts 2) through the services, with the
verifier and the drafter pinned to separate cores, against one cohort and against AR.

On a fleet the drafter and the verifier are separate devices: with one cohort each waits for the
other every round, with two the drafter drafts one half of the sessions while the verifier
verifies the other. Here each service gets one of the two cores (and one torch thread), which is
that setting in miniature. The same S sessions of real text go through AR (the verifier alone),
speculation with one cohort and with two, every output checked equal to AR's; per run the
component times (a round's draft and verify seconds, from the sessions' own metrics) give the
gain where the two run on separate devices: per round, one cohort costs t_draft + t_verify, two
cost max(t_draft, t_verify) per half.
"""

from __future__ import annotations

import json
import os
import statistics
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sparsespec.bench.capacity import BOOKS, concurrent_turns
from sparsespec.bench.prompts import kjv_prompts
from sparsespec.bench.report import replace_section
from sparsespec.errors import InvalidArgument

BEGIN, END = "<!-- cohorts-bench:begin -->", "<!-- cohorts-bench:end -->"
RUNS = (("ar", "ar", 1), ("spec", "spec", 1), ("spec-cohorts2", "spec", 2))   # label, mode, cohorts


@dataclass(frozen=True)
class CohortsConfig:
    model: str = "smollm2-135m"
    context: int = 4096
    sessions: int = 4
    max_tokens: int = 48
    k: int = 3
    budget: int = 256
    drafter_weights: str = "int8"

    def __post_init__(self):
        if self.sessions < 2:
            raise InvalidArgument("sessions", f"two cohorts need at least 2 sessions, got {self.sessions}")
        if self.max_tokens < 4:
            raise InvalidArgument("max_tokens", f"must be >= 4, got {self.max_tokens}")
        if len(os.sched_getaffinity(0)) < 2:
            raise InvalidArgument("cores", "pinning the verifier and the drafter apart needs 2 cores")


def _pin(pid: int, core: int) -> None:
    """Every thread of process `pid` (and those it starts later) onto one core."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {core})


@contextmanager
def _one_torch_thread():
    """Children started meanwhile run one torch/OpenMP thread each (one core each)."""
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(cfg: CohortsConfig, log=print) -> list[dict]:
    from sparsespec.client import SparseSpecClient
    from sparsespec.cluster import ClusterConfig, LocalCluster
    from sparsespec.models import load_tokenizer, resolve_model

    model_dir = resolve_model(cfg.model)
    prompts = kjv_prompts(load_tokenizer(model_dir), cfg.context, cfg.sessions, BOOKS)
    cores = sorted(os.sched_getaffinity(0))[:2]
    ar: list[list[int]] | None = None
    records = []
    for label, mode, cohorts in RUNS:
        ccfg = ClusterConfig(model=str(model_dir), budget=str(cfg.budget), drafter_weights=cfg.drafter_weights,
                             max_context=cfg.context + cfg.max_tokens + 8, max_batch=max(8, cfg.sessions),
                             k=cfg.k, cohorts=cohorts, http_port=None)
        log(f"{label}: a cluster with the verifier on core {cores[0]}, the drafter on core {cores[1]}")
        with _one_torch_thread(), LocalCluster(ccfg) as cluster:
            _pin(cluster.verifiers[0].popen.pid, cores[0])
            _pin(cluster.drafters[0].popen.pid, cores[1])
            if ar is None:      # the reference: the verifier alone, whole generations
                with SparseSpecClient(cluster.address) as c:
                    ar = [c.generate(p, max_tokens=cfg.max_tokens, mode="ar").token_ids for p in prompts]
            first, second, wall = concurrent_turns(cluster.address, prompts, ar, cfg.k, cfg.max_tokens, mode)
        equal = all(f[0].token_ids == a[:1] and r.token_ids == a[2:] for f, r, a in zip(first, second, ar))
        ms = [r.metrics for r in second]
        rounds = [m["rounds"] + m["ar_steps"] for m in ms]
        rec = {"run": label, "cohorts": cohorts, "sessions": cfg.sessions, "context": cfg.context,
               "k": cfg.k if mode == "spec" else 0,
               "decode_tok_s": sum(len(r.token_ids) for r in second) / wall, "wall_s": wall,
               "tau": statistics.median(m["tau"] for m in ms),
               "draft_ms_per_round": 1e3 * statistics.median(m["draft_s"] / n for m, n in zip(ms, rounds)),
               "verify_ms_per_round": 1e3 * statistics.median(m["verify_s"] / n for m, n in zip(ms, rounds)),
               "outputs_equal_ar": equal}
        records.append(rec)
        log(f"  {label}: {rec['decode_tok_s']:.2f} tok/s, tau {rec['tau']:.2f}, draft {rec['draft_ms_per_round']:.0f} "
            f"ms + verify {rec['verify_ms_per_round']:.0f} ms per round, equal={equal}")
    base = records[0]["decode_tok_s"]
    for rec in records:
        rec["vs_ar"] = rec["decode_tok_s"] / base
    one = records[1]
    d, v = one["draft_ms_per_round"], one["verify_ms_per_round"]
    one["separate_devices_overlap_gain"] = (d + v) / max(d, v)   # what two cohorts buy where both run at once
    return records


def run_cohorts(args) -> int:
    cfg = CohortsConfig(model=args.model, context=int((args.contexts or str(CohortsConfig.context)).split(",")[0]),
                        sessions=int((args.sessions or str(CohortsConfig.sessions)).split(",")[0]),
                        max_tokens=args.max_tokens, k=args.k or CohortsConfig.k,
                        drafter_weights=args.drafter_weights or CohortsConfig.drafter_weights)
    records = run(cfg)
    command = (f"sparsespec bench cohorts --contexts {cfg.context} --sessions {cfg.sessions} "
               f"--max-tokens {cfg.max_tokens} -k {cfg.k} --drafter-weights {cfg.drafter_weights}")
    out = Path(args.out)
    (out / "bench").mkdir(parents=True, exist_ok=True)
    (out / "bench" / "cohorts.json").write_text(json.dumps({"command": command, "records": records}, indent=1) + "\n")
    rows = [f"| {r['run']} | {r['cohorts']} | {r['decode_tok_s']:.2f} | {r['vs_ar']:.2f}x | {r['tau']:.2f} | "
            f"{r['draft_ms_per_round']:.0f} | {r['verify_ms_per_round']:.0f} | "
            f"{'yes' if r['outputs_equal_ar'] else '**no**'} |" for r in records]
    gain = records[1]["separate_devices_overlap_gain"]
    section = "\n".join([
        BEGIN, "## Cohorts: overlapped rounds through the services, verifier and drafter on separate cores", "",
        f"Command: `{command}` (JSON: `bench/cohorts.json`). {cfg.sessions} sessions of {cfg.context} tokens, "
        "the verifier pinned to one core and the drafter to the other (one torch thread each), through the "
        "SDK; decode tok/s = tokens of all sessions / decode wall time; draft and verify ms per round are the "
        "sessions' medians (with two cohorts the draft runs while the other cohort verifies). AR is the "
        "verifier alone on its core, so \"vs AR\" is tokens/s per verifier process, the capacity claim of a "
        "split deployment (the drafter on a device of its own); AR given both cores is the capacity table's.", "",
        "| run | cohorts | decode tok/s | vs AR | tau | draft ms / round | verify ms / round | = AR |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        f"Where draft and verify run on separate devices at once, two cohorts turn a round's draft + verify "
        f"into max(draft, verify): {gain:.2f}x from this run's one-cohort component times.", END])
    replace_section(out / "benchmarks.md", BEGIN, END, section)
    bad = [r for r in records if not r["outputs_equal_ar"]]
    if bad:
        print(f"error: {len(bad)} runs with outputs that differ from AR")
        return 1
    return 0
