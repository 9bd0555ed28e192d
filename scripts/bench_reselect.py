"""What a fed drafter's low-acceptance re-selections cost and buy (docs/benchmarks.md, "Fed re-selection").

S sessions of one context decoded in process (the capacity bench's engine, prompts and fed int8
drafter, k fixed), interleaved over `--reps`, under three FeedConfigs: "old" (a re-selection
whenever the last 4 rounds' alpha is below 0.5, the wait never grows), "backoff" (the default: a
re-selection that did not lift alpha doubles the wait, up to 64 rounds) and "never" (no
re-selection for alpha; the tail-full ones stay), and AR. Every output is checked equal to AR's.

    PYTHONPATH=. .venv/bin/python scripts/bench_reselect.py --context 4096 --sessions 4 --json docs/bench/reselect_4k.json
"""

from __future__ import annotations

import argparse
import json
import statistics

from sparsespec.bench.capacity import Bench, CapacityConfig, prompts_for
from sparsespec.spec.feed import FeedConfig

CONFIGS = {"old": FeedConfig(alpha_wait_max=FeedConfig.alpha_window), "backoff": FeedConfig(),
           "never": FeedConfig(alpha_threshold=0.0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("-k", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = CapacityConfig(contexts=(args.context,), sessions=(args.sessions,), k=args.k, service_cells=(),
                         ttft_contexts=())
    bench = Bench(cfg)
    rows = list(range(args.sessions))
    prompts = prompts_for(bench.tokenizer, args.context, cfg.num_prompts)[:args.sessions]
    bench.prefill(rows, prompts)
    bench.decode(rows, prompts, "spec", args.k, 16)                      # warm-up
    ar_tokens = bench.decode(rows, prompts, "ar", args.k, args.max_tokens)["tokens"]
    runs = {name: [] for name in (*CONFIGS, "ar")}
    for _ in range(args.reps):
        for name, feed_config in CONFIGS.items():
            bench.engine.feed_config = feed_config
            runs[name].append(bench.decode(rows, prompts, "spec", args.k, args.max_tokens))
        runs["ar"].append(bench.decode(rows, prompts, "ar", args.k, args.max_tokens))
    records = []
    for name, outs in runs.items():
        rec = {"run": name, "context": args.context, "sessions": args.sessions, "k": args.k if name != "ar" else 0,
               "decode_tok_s": [o["decode_tok_s"] for o in outs], "tau": statistics.median(o["tau"] for o in outs),
               "feed_refreshes": [o["feed_refreshes"] for o in outs], "feed_s": [o["feed_s"] for o in outs],
               "wall_s": [o["wall_s"] for o in outs],
               "outputs_equal_ar": all(o["tokens"] == ar_tokens for o in outs)}
        records.append(rec)
        print(f"{name:8s} decode tok/s {' '.join(f'{x:.2f}' for x in rec['decode_tok_s'])}  tau {rec['tau']:.2f}  "
              f"re-selections {rec['feed_refreshes']}  feed s {' '.join(f'{x:.2f}' for x in rec['feed_s'])}  "
              f"= AR {rec['outputs_equal_ar']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0 if all(r["outputs_equal_ar"] for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
