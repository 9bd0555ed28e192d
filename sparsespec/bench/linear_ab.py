"""`sparsespec bench linear`: what the CPU linear kernel (kernels/linear.py) buys, end to end.

The same process, rows and prompts decode with MKL (`F.linear`, backend "torch"), with oneDNN over
the dense weight (backend "dense") and over its blocked copy (backend "auto"), AR and speculation (the capacity bench's in-process engine, fixed k), the two
kernels interleaved rep by rep: runs in separate processes on this shared 2-core machine differ by
more than the kernels do. Every output is checked equal to AR under the same kernel, and the two
kernels' AR outputs are compared (they may differ only where fp32 rounding breaks a near-tie).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from sparsespec.bench.capacity import Bench, capacity_config, prompts_for
from sparsespec.kernels import linear as linear_kernel

KERNELS = {"torch": "MKL", "dense": "oneDNN dense", "auto": "oneDNN blocked"}


def run_linear_ab(args) -> int:
    args.service_cells, args.ttft_contexts = "", ""
    cfg = capacity_config(args)
    k, reps = args.k or 3, args.reps
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    bench = Bench(cfg)
    med, records = statistics.median, []
    for context in cfg.contexts:
        prompts = prompts_for(bench.tokenizer, context, max(cfg.sessions))
        print(f"context {context}: prefilling {len(prompts)} prompts", flush=True)
        bench.prefill(list(range(len(prompts))), prompts)
        for s in cfg.sessions:
            rows, cell = list(range(s)), prompts[:s]
            bench.decode(rows, cell, "spec", k, 8)                   # warm-up
            runs: dict[tuple[str, str], list[dict]] = {}
            for _ in range(reps):
                for backend in KERNELS:
                    old = linear_kernel.set_backend(backend)
                    try:
                        for mode in ("ar", "spec"):
                            runs.setdefault((backend, mode), []).append(
                                bench.decode(rows, cell, mode, k, cfg.max_tokens))
                    finally:
                        linear_kernel.set_backend(old)
            for backend, name in KERNELS.items():
                ar, spec = runs[backend, "ar"], runs[backend, "spec"]
                rec = {"context": context, "sessions": s, "k": k, "kernel": name,
                       "ar_tok_s": [r["decode_tok_s"] for r in ar], "spec_tok_s": [r["decode_tok_s"] for r in spec],
                       "tau": med(r["tau"] for r in spec),
                       "verify_ms": med(1e3 * r["verify_s_per_forward"] for r in spec),
                       "draft_ms_per_round": med(1e3 * r["draft_s_per_round"] for r in spec),
                       "outputs_equal_ar": all(r["tokens"] == ar[0]["tokens"] for r in ar + spec),
                       "ar_equal_across_kernels": ar[0]["tokens"] == runs["torch", "ar"][0]["tokens"]}
                rec["spec_vs_ar"] = med(rec["spec_tok_s"]) / med(rec["ar_tok_s"])
                records.append(rec)
                print(f"  {context} S={s} {name:14s}: AR {med(rec['ar_tok_s']):6.2f} tok/s {_span(rec['ar_tok_s'])}, "
                      f"spec {med(rec['spec_tok_s']):6.2f} {_span(rec['spec_tok_s'])} ({rec['spec_vs_ar']:.2f}x), "
                      f"verify {rec['verify_ms']:.0f} ms, draft {rec['draft_ms_per_round']:.0f} ms/round, "
                      f"= AR {rec['outputs_equal_ar']}, AR = MKL's AR {rec['ar_equal_across_kernels']}", flush=True)
    out = Path(args.out) / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear.json").write_text(json.dumps({"model": cfg.model, "max_tokens": cfg.max_tokens, "reps": reps,
                                                 "drafter_weights": cfg.drafter_weights, "records": records}, indent=1))
    print(f"wrote {out / 'linear.json'}")
    return 0 if all(r["outputs_equal_ar"] for r in records) else 1


def _span(values: list[float]) -> str:
    return f"[{min(values):.2f}, {max(values):.2f}]"
