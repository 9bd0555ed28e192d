"""`sparsespec`: generate, fetch models, benchmark, demo.

Every user error ends as one line on stderr (`error: <field>: <problem>`) and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from sparsespec.errors import SparseSpecError


# Subcommands that live with the code they drive: each module has add_parser(sub) and run(args).
# Their heavy imports (torch, ray) happen inside run(), so `sparsespec --help` stays fast.
EXTENSIONS = {
    "train": "sparsespec.train.cli",
    "ray": "sparsespec.deploy.ray_cli",
}


def _add_engine_flags(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required,
                   help="model directory, .gguf file, or a known name (smollm2-135m)")
    p.add_argument("--drafter", default="same", help="same | DIR | layers:N (default: same)")
    p.add_argument("--drafter-weights", default="same",
                   help="the drafter's weights: same (the model's own) | bf16 | int8 | int4 (weight-only; "
                        "the verifier is untouched, so the output is too)")
    p.add_argument("--policy", default=None,
                   help="streaming | chunk_topk | snapkv | verifier_guided | fed | full (default: fed, the "
                        "verifier's exact K/V, for a drafter that shares them: same or layers:N; "
                        "chunk_topk otherwise, which also turns feeding off)")
    p.add_argument("--budget", default="256", help="drafter KV entries per layer, or 'full'")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--max-context", type=int, default=None, help="context limit (default: the model's)")


def _add_request_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-k", type=int, default=4, help="draft length (1..64); the start value when adaptive")
    p.add_argument("--adaptive", action="store_true", help="adapt k to acceptance, switch speculation off when it does not pay")
    p.add_argument("--mode", default="spec", help="spec | ar")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--prompt-file")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsespec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate in this process, or through a verifier (--server)")
    _add_engine_flags(gen, model_required=False)
    _add_request_flags(gen)
    gen.add_argument("--server", action="append", default=[],
                     help="HOST:PORT of a verifier (repeatable: the SDK fails over between them)")
    gen.add_argument("--chat", action="store_true",
                     help="the prompt is a user message, sent through the model's chat template")
    gen.add_argument("--api-key", default=None, help="with --server: the API key (default $SPARSESPEC_API_KEY)")
    gen.add_argument("--tls-ca", default=None, help="with --server: TLS, verifying the verifier with this CA (PEM)")
    gen.add_argument("--tls-server-name", default=None,
                     help="with --tls-ca: the name the verifier's certificate carries, if not the address")

    serve = sub.add_parser("serve", help="run one service: serve verifier|drafter|gateway --help")
    serve.add_argument("role", choices=["verifier", "drafter", "gateway"])
    serve.add_argument("service_args", nargs=argparse.REMAINDER)

    from sparsespec.cluster import RestartPolicy
    from sparsespec.redis_server import PERSISTENCE

    up = sub.add_parser("up", help="local cluster on 127.0.0.1: redis-server, one drafter, one verifier, the "
                                   "OpenAI HTTP gateway; a child that exits is restarted on its port")
    _add_engine_flags(up)
    up.add_argument("--max-batch", type=int, default=8)
    up.add_argument("--cohorts", type=int, default=1,
                    help="2: the verifier overlaps rounds, drafting one half of the sessions while verifying the other")
    up.add_argument("-k", type=int, default=4, help="the verifier's default draft length")
    up.add_argument("--redis-persistence", default="everysec", choices=list(PERSISTENCE),
                    help="Redis append-only file fsync: everysec (a machine crash loses <= ~1 s), always, "
                         "or none (a Redis restart loses every session); docs/deploy.md, Durability")
    up.add_argument("--redis-dir", default=None,
                    help="keep Redis' data here, across `up` runs (default: a temp dir removed at exit)")
    up.add_argument("--max-crashes", type=int, default=RestartPolicy.max_crashes,
                    help="stop the cluster (exit 1) when a child exits this many times in a row")
    up.add_argument("--http-port", type=int, default=0,
                    help="port of the OpenAI-compatible HTTP gateway (default 0: pick a free one)")
    up.add_argument("--no-http", action="store_true", help="do not start the HTTP gateway")
    up.add_argument("--api-keys", default=None, metavar="FILE",
                    help="API keys (one per line) for the gRPC API and the gateway; sessions belong to their key")
    up.add_argument("--tls-cert", default=None, help="PEM certificate of every service (TLS on every gRPC hop, HTTPS on the gateway)")
    up.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    up.add_argument("--tls-ca", default=None, help="the CA that signed --tls-cert (clients verify with it)")
    up.add_argument("--mtls", action="store_true",
                    help="the drafter requires the verifier's client certificate (--tls-cert, signed by --tls-ca)")

    models = sub.add_parser("models", help="named models")
    msub = models.add_subparsers(dest="models_command", required=True)
    fetch = msub.add_parser("fetch", help="download and convert a named model; prints its directory")
    fetch.add_argument("name")

    demo = sub.add_parser("demo", help="long-context speculative generation on real text, AR vs speculative")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--context", type=int, default=7800)
    demo.add_argument("--max-tokens", type=int, default=96)
    demo.add_argument("--policy", default=None, help="the drafter's policy (default: fed where it can be)")
    demo.add_argument("--budget", default="256")
    demo.add_argument("--drafter", default="same")
    demo.add_argument("--drafter-weights", default="int8",
                      help="the drafter's weights: same | bf16 | int8 | int4 (default int8: the low-memory drafter)")
    demo.add_argument("-k", type=int, default=4)
    demo.add_argument("--in-process", action="store_true", help="run the engine here instead of through services")

    bench = sub.add_parser("bench", help="benchmarks: speed (docs/benchmarks.md) or the acceptance study "
                                          "(docs/acceptance.md)")
    bench.add_argument("suite", nargs="?", default="speed", choices=["speed", "acceptance", "verify", "capacity", "cohorts",
                                                             "linear"],
                       help="speed: AR vs speculative vs transformers; acceptance: tau per policy, "
                            "budget and context, with KV summaries; verify: a (k+1)-token verify "
                            "forward against an AR step (c_verify of the cost model); capacity: aggregate "
                            "decode tok/s, AR vs speculation, over sessions x context, in process and "
                            "through the services; cohorts: overlapped rounds (--cohorts 2) through the services, "
                            "verifier and drafter pinned to separate cores; linear: AR and speculation on "
                            "each CPU linear kernel (MKL, oneDNN), interleaved in one process")
    bench.add_argument("--quick", action="store_true", help="a small grid, for smoke runs")
    bench.add_argument("--out", default="docs", help="directory for the markdown, JSON and plots")
    bench.add_argument("--model", default="smollm2-135m")
    bench.add_argument("--contexts", default=None,
                       help="prompt lengths in tokens, comma-separated (speed: 1024,2048,4096; "
                            "acceptance: 2048,4096,8000)")
    bench.add_argument("--prompts", type=int, default=None,
                       help="prompts per context (speed: 3 books; acceptance: 2 documents per source, so "
                            "6 per cell over the 3 sources)")
    bench.add_argument("--max-tokens", type=int, default=None,
                       help="tokens per generation (default 48; acceptance: 32)")
    bench.add_argument("-k", type=int, default=None,
                       help="draft length (speed: 4; acceptance: chosen on held-out prompts)")
    bench.add_argument("--budgets", default="64,256,1024", help="acceptance: drafter budgets")
    bench.add_argument("--policies", default="streaming,chunk_topk,snapkv,fed,verifier_guided,full",
                       help="acceptance: policies (fed only for drafters the verifier can feed, verifier_guided "
                            "only for the others)")
    bench.add_argument("--drafters", default="same",
                       help="acceptance: same | layers:N | DIR | LABEL=DIR, comma-separated (outputs name "
                            "a DIR by its LABEL, or its last component)")
    bench.add_argument("--sources", default="kjv,code,retrieval", help="acceptance: prompt sources")
    bench.add_argument("--heldout", type=int, default=1, help="acceptance: held-out documents per source (choose k)")
    bench.add_argument("--temperatures", default="0",
                       help="acceptance: sampling temperatures (e.g. 0,0.7; greedy runs are checked against AR)")
    bench.add_argument("--append", action="store_true",
                       help="acceptance: add to the results already in --out (a grid run in parts)")
    bench.add_argument("--layers", type=int, default=6, help="N of the layers:N drafter")
    bench.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    bench.add_argument("--services", action="store_true",
                       help="benchmark the disaggregated system instead (1/4/8 concurrent sessions)")
    bench.add_argument("--sessions", default="1,4,8", help="concurrency levels for --services and verify")
    bench.add_argument("--reps", type=int, default=None, help="verify: timed forwards per cell (default 5); "
                                                            "linear: interleaved decodes per kernel (default 3); "
                                                            "capacity: interleaved decodes per cell and mode, "
                                                            "the median kept (default 1)")
    bench.add_argument("--policy", default=None, help="capacity: the drafter's policy (default fed)")
    bench.add_argument("--budget", default=None, help="capacity: the drafter's budget (default 256)")
    bench.add_argument("--drafter", default=None, help="capacity: same | layers:N (default same)")
    bench.add_argument("--drafter-weights", default=None, help="capacity: same | bf16 | int8 | int4 (default int8)")
    bench.add_argument("--service-cells", default=None,
                       help="capacity: SxCONTEXT cells also run through the services (default 4x4096,8x8000; "
                            "'' for none)")
    bench.add_argument("--ttft-contexts", default=None,
                       help="capacity: contexts whose time to first token is measured through the services "
                            "(default 4096; '' for none)")
    bench.add_argument("--ttft-prompts", type=int, default=None,
                       help="capacity: prompts per time-to-first-token cell (default 3)")
    bench.add_argument("--json", default=None, help="capacity: also write the records to this JSON file")
    bench.add_argument("--adaptive", action="store_true",
                       help="capacity: also run every cell with adaptive k (an 'adaptive' row beside spec)")
    bench.add_argument("--device", default=None, help="capacity: cpu | cuda | cuda:N for the in-process cells (default cpu)")
    for module in EXTENSIONS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise SparseSpecError(f"prompt-file: cannot read {args.prompt_file}: {e.strerror}") from None


def cmd_generate(args) -> int:
    if args.server:
        return cmd_generate_remote(args)
    if not args.model:
        raise SparseSpecError("model: --model is required (or --server HOST:PORT)")
    from sparsespec.build import EngineConfig, build_engine, parse_budget
    from sparsespec.spec.adaptive import AdaptiveConfig, MAX_K
    from sparsespec.spec.loop import GenerationRequest
    from sparsespec.spec.sampling import SamplingParams

    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)
    if not 1 <= args.k <= MAX_K:
        raise SparseSpecError(f"k: must be in [1, {MAX_K}], got {args.k}")
    adaptive = AdaptiveConfig(enabled=args.adaptive, k_max=min(MAX_K, max(args.k * 2, 8)))
    prompt = _read_prompt(args)
    if not prompt:
        raise SparseSpecError("prompt: is empty")
    cfg = EngineConfig(model=args.model, drafter=args.drafter, policy=args.policy,
                       budget=parse_budget(args.budget), dtype=args.dtype, max_context=args.max_context,
                       max_batch=1, drafter_weights=args.drafter_weights)
    engine, tokenizer = build_engine(cfg)
    if args.chat:
        from sparsespec.chat import chat_prompt_ids
        ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}], "prompt")
    else:
        from sparsespec.tokens import encode_prompt
        ids = encode_prompt(tokenizer, prompt)
    req = GenerationRequest(ids, args.max_tokens, sampling, args.k, adaptive, tuple(args.stop), args.mode)
    result = engine.generate(req)
    if args.json:
        print(json.dumps({"token_ids": result.token_ids, "text": result.text,
                          "metrics": result.metrics.to_dict()}))
    else:
        print(result.text)
        from sparsespec.report import metrics_table
        print(metrics_table([(args.mode, result.metrics)]), file=sys.stderr)
    return 0


def cmd_generate_remote(args) -> int:
    """The same flags and JSON as in-process, through the client SDK."""
    from sparsespec.client import GenerationError, SparseSpecClient

    import os

    from sparsespec.auth import ENV_CLIENT_KEY
    from sparsespec.tls import client_tls

    prompt = _read_prompt(args)
    if not prompt:
        raise SparseSpecError("prompt: is empty")
    tls = client_tls(args.tls_ca, server_name=args.tls_server_name)
    with SparseSpecClient(args.server, api_key=args.api_key or os.environ.get(ENV_CLIENT_KEY) or None,
                          root_certificates=tls.ca if tls else None, tls_server_name=args.tls_server_name) as client:
        try:
            opts = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), k=args.k, mode=args.mode,
                        adaptive=args.adaptive)
            if args.chat:     # the tokenizer of --model, or of the model the verifier serves
                done = client.chat([{"role": "user", "content": prompt}], tokenizer=args.model, **opts)
            else:
                done = client.generate(prompt, **opts)
        except GenerationError as e:
            raise SparseSpecError(e.message) from None
    if args.json:
        print(json.dumps({"token_ids": done.token_ids, "text": done.text, "session_id": done.session_id,
                          "metrics": done.metrics}))
    else:
        print(done.text)
    return 0


def cmd_up(args) -> int:
    """Start the local cluster, print `ready HOST:PORT`, restart a child that exits (on its port),
    stop everything on Ctrl-C / SIGTERM (exit 0) or when a child keeps crashing (exit 1)."""
    import signal
    import threading

    from sparsespec.build import parse_budget
    from sparsespec.cluster import ClusterConfig, LocalCluster, RestartPolicy

    parse_budget(args.budget)  # validate before starting anything
    policy = RestartPolicy(max_crashes=args.max_crashes)
    cfg = ClusterConfig(model=args.model, drafter=args.drafter, policy=args.policy, budget=args.budget,
                        drafter_weights=args.drafter_weights, dtype=args.dtype, max_context=args.max_context, max_batch=args.max_batch, cohorts=args.cohorts, k=args.k,
                        redis_persistence=args.redis_persistence, redis_dir=args.redis_dir,
                        http_port=None if args.no_http else args.http_port, api_keys=args.api_keys,
                        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, mtls=args.mtls)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    with LocalCluster(cfg) as cluster:
        # The password is in a 0600 file, never on the terminal (or in a log that captures it).
        secret = f" password-file {cluster.redis.password_file}" if cluster.redis.password else ""
        print(f"redis {cluster.redis.public_url} pid {cluster.redis.proc.pid}{secret}", flush=True)
        for proc in cluster.drafters + cluster.verifiers + cluster.gateways:    # gateway http://HOST:PORT
            print(f"{proc.name.rstrip('0123456789')} {proc.address} pid {proc.popen.pid}", flush=True)
        for proc in cluster.drafters + cluster.verifiers:      # Prometheus; the gateway's is URL/metrics
            print(f"metrics {proc.name} {proc.wait_metrics()}", flush=True)
        print(f"ready {cluster.address}", flush=True)
        ok = cluster.supervise(done, policy)
        print("stopping", flush=True)
    return 0 if ok else 1


def cmd_serve(args) -> int:
    if args.role == "verifier":
        from verifier_service.server import main as serve
    elif args.role == "gateway":
        from sparsespec.gateway.server import main as serve
    else:
        from drafter_service.server import main as serve
    return serve(args.service_args)


def cmd_models(args) -> int:
    from sparsespec.models import fetch
    print(fetch(args.name))
    return 0


def cmd_demo(args) -> int:
    from sparsespec.demo import run_demo
    return run_demo(args)


def cmd_bench(args) -> int:
    import os

    args.threads = args.threads or os.cpu_count() or 1
    if args.max_tokens is None:
        args.max_tokens = 32 if args.suite == "acceptance" else 48
    if args.suite == "verify":
        from sparsespec.bench.verify_cost import run_verify_cost
        args.contexts, args.k, args.reps = args.contexts or "4096,8000", args.k or 4, args.reps or 5
        if args.quick:
            args.contexts, args.sessions, args.reps = "512", "1,2", 2
        return run_verify_cost(args)
    if args.suite == "linear":
        from sparsespec.bench.linear_ab import run_linear_ab
        args.reps = args.reps or 3
        if args.quick:
            args.contexts, args.sessions, args.max_tokens, args.reps = args.contexts or "512", "1,2", 12, 1
        return run_linear_ab(args)
    if args.suite == "capacity":
        from sparsespec.bench.capacity import run_capacity
        if args.quick:
            args.contexts, args.sessions, args.max_tokens = args.contexts or "512", "1,2", 12
            args.service_cells = "2x512" if args.service_cells is None else args.service_cells
            args.ttft_contexts = "512" if args.ttft_contexts is None else args.ttft_contexts
        return run_capacity(args)
    if args.suite == "cohorts":
        from sparsespec.bench.cohorts import run_cohorts
        if args.quick:
            args.contexts, args.sessions, args.max_tokens = args.contexts or "512", "2", 12
        elif "," in (args.sessions or ""):          # the suites' default list: this one takes one S
            args.sessions = None
        return run_cohorts(args)
    if args.suite == "acceptance":
        from sparsespec.bench.acceptance import run_acceptance
        args.contexts = args.contexts or "2048,4096,8000"
        args.prompts = args.prompts or 2
        if args.quick:
            args.contexts, args.prompts, args.max_tokens, args.budgets = "512", 1, 16, "64"
        return run_acceptance(args)
    from sparsespec.bench.engine_bench import run_bench
    args.contexts, args.prompts, args.k = args.contexts or "1024,2048,4096", args.prompts or 3, args.k or 4
    if args.quick:
        args.contexts, args.prompts, args.max_tokens = "1024", 1, 16
    if args.services:
        from sparsespec.bench.service_bench import run_service_bench
        return run_service_bench(args)
    return run_bench(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"generate": cmd_generate, "models": cmd_models, "demo": cmd_demo, "bench": cmd_bench,
                "up": cmd_up, "serve": cmd_serve}
    if args.command in EXTENSIONS:
        handlers[args.command] = importlib.import_module(EXTENSIONS[args.command]).run
    try:
        return handlers[args.command](args)
    except SparseSpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
