"""The main job: long-context speculative generation on real text, against AR in the same run.

Fetches SmolLM2-135M (once), takes ~7.8K tokens of the King James Bible as the prompt, and
decodes it greedily twice: with the verifier alone (AR) and with the sparse-budget drafter
(spec). By default both go through the disaggregated system: a local cluster (redis-server, a
drafter process, a verifier process, gRPC on 127.0.0.1) and the client SDK, streaming the
continuation as it is committed. `--in-process` runs the same engine in this process instead.
Prints the continuation, a metrics table and whether the two outputs are identical (exit 1 if not).
"""

from __future__ import annotations

import sys

from sparsespec.build import EngineConfig, build_engine, default_policy, load_verifier, parse_budget
from sparsespec.data import kjv
from sparsespec.errors import InvalidArgument
from sparsespec.report import human_bytes, metrics_table
from sparsespec.spec.loop import GenerationRequest


def run_demo(args) -> int:
    if args.context < 2:
        raise InvalidArgument("context", f"must be >= 2 tokens, got {args.context}")
    parse_budget(args.budget)
    args.policy = args.policy or default_policy(args.drafter)
    run = _in_process if args.in_process else _through_services
    ar, spec = run(args)
    return _report(args, ar, spec)


def _describe(args, n: int, where: str) -> None:
    print(f"prompt: {n} tokens of the King James Bible (Genesis, public domain); drafter {args.drafter} "
          f"({args.drafter_weights} weights), policy {args.policy}, budget {args.budget}, k {args.k}; {where}",
          flush=True)


def _through_services(args):
    """AR and spec through a local cluster and the SDK; returns ((ids, text, metrics) x 2)."""
    from sparsespec.client import SparseSpecClient
    from sparsespec.cluster import ClusterConfig, LocalCluster
    from sparsespec.models import load_tokenizer, resolve_model

    model_dir = resolve_model(args.model)
    prompt = kjv.prompt_of_tokens(load_tokenizer(model_dir), args.context, book="Genesis")
    cfg = ClusterConfig(model=str(model_dir), drafter=args.drafter, drafter_weights=args.drafter_weights,
                        policy=args.policy, budget=str(args.budget),
                        max_context=args.context + args.max_tokens + 1, max_batch=2, k=args.k)
    print("starting the local cluster (redis-server, drafter, verifier) ...", flush=True)
    with LocalCluster(cfg) as cluster, SparseSpecClient(cluster.address) as client:
        _describe(args, len(prompt), f"verifier {cluster.address}, drafter {cluster.drafters[0].address}")
        client.generate(prompt[:32], max_tokens=4)         # warm-up: first-call costs stay out of the table
        ar = client.generate(prompt, max_tokens=args.max_tokens, mode="ar")
        print("\n--- continuation (speculative, streamed as committed) ---")
        ids, text, metrics = [], [], {}
        for chunk in client.stream(prompt, max_tokens=args.max_tokens, k=args.k):
            print(chunk.text, end="", flush=True)
            ids += chunk.token_ids
            text.append(chunk.text)
            metrics = chunk.metrics or metrics
        print("\n--- end ---\n")
    return (ar.token_ids, ar.text, ar.metrics), (ids, "".join(text), metrics)


def _in_process(args):
    # The context limit is what this run needs, so no cache is sized for the model's full 8K.
    cfg = EngineConfig(model=args.model, drafter=args.drafter, drafter_weights=args.drafter_weights,
                       policy=args.policy, budget=parse_budget(args.budget),
                       max_context=args.context + args.max_tokens + 1, max_batch=1)
    verifier, tokenizer = load_verifier(cfg)
    engine, _ = build_engine(cfg, verifier, tokenizer)
    prompt = kjv.prompt_of_tokens(tokenizer, args.context, book="Genesis")
    _describe(args, len(prompt), "in process")
    ar = engine.generate(GenerationRequest(prompt, args.max_tokens, k=args.k, mode="ar"))
    spec = engine.generate(GenerationRequest(prompt, args.max_tokens, k=args.k, mode="spec"))
    print("\n--- continuation (speculative) ---")
    print(spec.text)
    print("--- end ---\n")
    return ((ar.token_ids, ar.text, ar.metrics.to_dict()), (spec.token_ids, spec.text, spec.metrics.to_dict()))


def _report(args, ar, spec) -> int:
    (ar_ids, _, ar_m), (spec_ids, _, m) = ar, spec
    print(metrics_table([("ar", ar_m), ("spec", m)]))
    speedup = m["tokens_per_s"] / ar_m["tokens_per_s"] if ar_m["tokens_per_s"] else 0.0
    print(f"\nspeedup (decode tokens/s, spec / ar): {speedup:.2f}x")
    print(f"drafter KV on device: {human_bytes(m['drafter_kv_device_bytes'])} "
          f"(+ {human_bytes(m['drafter_kv_host_bytes'])} host tier); verifier KV: "
          f"{human_bytes(m['verifier_kv_bytes'])}")
    equal = spec_ids == ar_ids
    print(f"speculative output equals AR output: {'yes' if equal else 'NO'} "
          f"({len(spec_ids)} vs {len(ar_ids)} tokens)")
    if not equal:
        print("error: speculative decoding changed the output; this is a bug", file=sys.stderr)
        return 1
    return 0
