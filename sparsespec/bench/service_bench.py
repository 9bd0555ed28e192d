"""`sparsespec bench --services`: the disaggregated system under 1, 4 and 8 concurrent sessions.

One local cluster (redis-server, a drafter process, a verifier process, gRPC on 127.0.0.1), the
same prompts decoded with mode ar and mode spec through the SDK, in this one run. Reports the
verifier's aggregate throughput, per-session decode tokens/s, tau/alpha, and the per-round
RPC overhead of a draft (verifier-side call time minus drafter-side work), p50/p95.
Outputs are checked: every spec output must equal the AR output of the same prompt.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path

from sparsespec.bench.engine_bench import BOOKS
from sparsespec.bench.prompts import kjv_prompts
from sparsespec.bench.report import replace_section
from sparsespec.client import SparseSpecClient
from sparsespec.cluster import ClusterConfig, LocalCluster
from sparsespec.models import load_tokenizer, resolve_model

BEGIN, END = "<!-- service-bench:begin -->", "<!-- service-bench:end -->"


def _prompts(tokenizer, context: int, n: int) -> list[list[int]]:
    return kjv_prompts(tokenizer, context, n, BOOKS)


def _concurrent(address: str, prompts, max_tokens: int, mode: str, k: int) -> tuple[float, list]:
    results: list = [None] * len(prompts)
    errors: list = []

    def one(i):
        try:
            with SparseSpecClient(address) as client:
                results[i] = client.generate(prompts[i], max_tokens=max_tokens, mode=mode, k=k)
        except Exception as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return wall, results


def run_service_bench(args) -> int:
    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    levels = [int(x) for x in str(args.sessions).split(",")]
    context = int(str(args.contexts).split(",")[0])
    cfg = ClusterConfig(model=str(model_dir), policy="chunk_topk", budget="256", k=args.k,
                        max_context=context + args.max_tokens + 8, max_batch=max(levels))
    rows, runs, bad = [], [], 0
    with LocalCluster(cfg) as cluster:
        _concurrent(cluster.address, _prompts(tokenizer, 64, 1), 4, "spec", args.k)   # warm-up
        for n in levels:
            prompts = _prompts(tokenizer, context, n)
            outs = {}
            for mode in ("ar", "spec"):
                wall, results = _concurrent(cluster.address, prompts, args.max_tokens, mode, args.k)
                outs[mode] = results
                generated = sum(len(r.token_ids) for r in results)
                per = [r.metrics["tokens_per_s"] for r in results]
                row = {"sessions": n, "mode": mode, "wall_s": wall, "throughput": generated / wall,
                       "decode_tps_median": statistics.median(per), "decode_tps_min": min(per),
                       "decode_tps_max": max(per),
                       "tau": statistics.median(r.metrics["tau"] for r in results),
                       "alpha": statistics.median(r.metrics["alpha"] for r in results),
                       "rpc_p50_ms": statistics.median(r.metrics["draft_overhead_p50_ms"] for r in results),
                       "rpc_p95_ms": max(r.metrics["draft_overhead_p95_ms"] for r in results)}
                rows.append(row)
                runs += [{"sessions": n, "mode": mode, "prompt": i, "token_ids": r.token_ids,
                          "metrics": r.metrics} for i, r in enumerate(results)]
                print(f"[{n} sessions {mode:>4}] {row['throughput']:7.2f} tok/s aggregate, "
                      f"median session {row['decode_tps_median']:.2f} tok/s, tau {row['tau']:.2f}, "
                      f"RPC p50 {row['rpc_p50_ms']:.2f} ms p95 {row['rpc_p95_ms']:.2f} ms", flush=True)
            mismatched = [i for i, (a, s) in enumerate(zip(outs["ar"], outs["spec"])) if a.token_ids != s.token_ids]
            bad += len(mismatched)
            for row in rows[-2:]:
                row["spec_equals_ar"] = not mismatched
    command = (f"sparsespec bench --services --model {args.model} --contexts {context} --sessions "
               f"{args.sessions} --max-tokens {args.max_tokens} -k {args.k} --out {args.out}")
    _write(Path(args.out), rows, runs, command, context, args.max_tokens)
    if bad:
        print(f"error: {bad} speculative outputs differ from AR")
        return 1
    return 0


def _write(out: Path, rows, runs, command: str, context: int, max_tokens: int) -> None:
    (out / "bench").mkdir(parents=True, exist_ok=True)
    (out / "bench" / "services.json").write_text(json.dumps({"command": command, "rows": rows, "runs": runs},
                                                            indent=1) + "\n")
    lines = ["| sessions | mode | aggregate tok/s | per-session decode tok/s median [min, max] | tau | alpha "
             "| draft RPC overhead p50 / p95 | spec = AR |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spec = r["mode"] == "spec"
        lines.append(f"| {r['sessions']} | {r['mode']} | {r['throughput']:.2f} | {r['decode_tps_median']:.2f} "
                     f"[{r['decode_tps_min']:.2f}, {r['decode_tps_max']:.2f}] | "
                     f"{r['tau']:.2f} | {r['alpha']:.2f} | "
                     + (f"{r['rpc_p50_ms']:.2f} / {r['rpc_p95_ms']:.2f} ms" if spec else "-")
                     + f" | {'yes' if r['spec_equals_ar'] else '**no**'} |")
    section = "\n".join([
        BEGIN, "## Services: verifier throughput and draft RPC overhead (gRPC on 127.0.0.1, Redis)", "",
        f"Command: `{command}`", "",
        f"One local cluster (redis-server, one drafter process: same model, chunk_topk, budget 256; one "
        f"verifier process), {context}-token King James Bible prompts, {max_tokens} new tokens per session, "
        "sessions started together through the SDK. Aggregate tok/s = all generated tokens / wall time "
        "(prefill included). The draft RPC overhead is the verifier-side time of a Draft call minus the "
        "drafter's own work, per round. Every output is in `bench/services.json`.", "",
        *lines, END])
    replace_section(out / "benchmarks.md", BEGIN, END, section)
