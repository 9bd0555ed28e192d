"""The main job: long-context speculative generation on real text, against AR in the same run.

Fetches SmolLM2-135M (once), takes ~3.5K tokens of the King James Bible as the prompt, decodes
greedily with the verifier alone (AR) and with the sparse-budget drafter (spec), and prints the
continuation, a metrics table, and whether the two outputs are identical. Exit code 1 if not.
"""

from __future__ import annotations

import sys

from sparsespec.build import EngineConfig, build_engine, load_verifier, parse_budget
from sparsespec.data import kjv
from sparsespec.errors import InvalidArgument
from sparsespec.report import human_bytes, metrics_table
from sparsespec.spec.loop import GenerationRequest


def run_demo(args) -> int:
    if args.context < 2:
        raise InvalidArgument("context", f"must be >= 2 tokens, got {args.context}")
    # The context limit is what this run needs, so no cache is sized for the model's full 8K.
    cfg = EngineConfig(model=args.model, drafter=args.drafter, policy=args.policy,
                       budget=parse_budget(args.budget), max_context=args.context + args.max_tokens + 1,
                       max_batch=1)
    print(f"loading {cfg.model} ...", flush=True)
    verifier, tokenizer = load_verifier(cfg)
    engine, _ = build_engine(cfg, verifier, tokenizer)
    prompt = kjv.prompt_of_tokens(tokenizer, args.context, book="Genesis")
    print(f"prompt: {len(prompt)} tokens of the King James Bible (Genesis, public domain); "
          f"drafter {cfg.drafter}, policy {cfg.policy}, budget {args.budget}, k {args.k}", flush=True)

    ar = engine.generate(GenerationRequest(prompt, args.max_tokens, k=args.k, mode="ar"))
    spec = engine.generate(GenerationRequest(prompt, args.max_tokens, k=args.k, mode="spec"))

    print("\n--- continuation (speculative) ---")
    print(spec.text)
    print("--- end ---\n")
    print(metrics_table([("ar", ar.metrics), ("spec", spec.metrics)]))
    equal = spec.token_ids == ar.token_ids
    m = spec.metrics
    speedup = m.tokens_per_s / ar.metrics.tokens_per_s if ar.metrics.tokens_per_s else 0.0
    print(f"\nspeedup (decode tokens/s, spec / ar): {speedup:.2f}x")
    print(f"drafter KV on device: {human_bytes(m.drafter_kv_device_bytes)} "
          f"(+ {human_bytes(m.drafter_kv_host_bytes)} host tier); verifier KV: "
          f"{human_bytes(m.verifier_kv_bytes)}")
    print(f"speculative output equals AR output: {'yes' if equal else 'NO'} "
          f"({len(spec.token_ids)} vs {len(ar.token_ids)} tokens)")
    if not equal:
        print("error: speculative decoding changed the output; this is a bug", file=sys.stderr)
        return 1
    return 0
