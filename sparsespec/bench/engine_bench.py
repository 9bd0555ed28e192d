"""`sparsespec bench`: our AR, our speculative decoding and transformers on the same prompts.

Every run decodes greedily from the same real-text prompts in this one process; every output is
saved and compared with our AR output (a speculative output that differs is a bug, exit code 1).
Results: <out>/bench/engine.json (all runs and outputs) and a table in <out>/benchmarks.md.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass

import torch

from sparsespec.bench import report
from sparsespec.bench.hf_baseline import hf_generate, load_hf
from sparsespec.build import EngineConfig, build_engine, load_verifier
from sparsespec.data import kjv
from sparsespec.errors import InvalidArgument
from sparsespec.models import resolve_model
from sparsespec.spec.loop import GenerationRequest

POLICIES = ("streaming", "chunk_topk", "snapkv")
BUDGETS = (64, 256, 1024)
BOOKS = ("Genesis", "Exodus", "Matthew", "Isaiah", "Luke")


@dataclass(frozen=True)
class Variant:
    system: str                 # ours-ar | ours-spec | hf-generate | hf-assisted
    drafter: str = "-"          # same | layers:N
    policy: str = "-"
    budget: int | None = None   # None: full cache
    k: int = 0

    @property
    def name(self) -> str:
        if self.system == "ours-spec":
            budget = "full" if self.budget is None else self.budget
            return f"{self.system} {self.drafter} {self.policy}/{budget} k={self.k}"
        return self.system if self.drafter == "-" else f"{self.system} {self.drafter}"


def variants(quick: bool, k: int, layers: int) -> list[Variant]:
    small = f"layers:{layers}"
    grid = [Variant("ours-ar")]
    if quick:
        grid.append(Variant("ours-spec", "same", "chunk_topk", 256, k))
    else:
        grid += [Variant("ours-spec", "same", p, b, k) for p in POLICIES for b in BUDGETS]
        grid.append(Variant("ours-spec", "same", "full", None, k))
    grid += [Variant("ours-spec", small, "full", None, k), Variant("hf-generate"),
             Variant("hf-assisted", small)]
    return grid


def run_bench(args) -> int:
    contexts = [int(c) for c in str(args.contexts).split(",")]
    if any(c < 2 for c in contexts):
        raise InvalidArgument("contexts", f"every context must be >= 2 tokens, got {contexts}")
    if not 1 <= args.prompts <= len(BOOKS):
        raise InvalidArgument("prompts", f"must be in [1, {len(BOOKS)}], got {args.prompts}")
    max_context = max(contexts) + args.max_tokens + 8
    cfg = EngineConfig(model=args.model, max_context=max_context, max_batch=1)
    verifier, tokenizer = load_verifier(cfg)
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    hf_models = {None: load_hf(model_dir), args.layers: load_hf(model_dir, args.layers)}
    eos = verifier.cfg.eos_token_ids
    grid = variants(args.quick, args.k, args.layers)

    runs = []
    for context in contexts:
        prompts = [kjv.prompt_of_tokens(tokenizer, context, book=b) for b in BOOKS[:args.prompts]]
        _warm_up(verifier, tokenizer, hf_models[None], prompts[0][:64], eos)
        for i, prompt in enumerate(prompts):
            ar_tokens = None
            for v in grid:
                run = _run_one(v, prompt, args, cfg, verifier, tokenizer, hf_models, eos)
                ar_tokens = run["token_ids"] if v.system == "ours-ar" else ar_tokens
                run.update(context=context, prompt=i, book=BOOKS[i], variant=v.name, **asdict(v))
                run["first_divergence"] = report.first_divergence(run["token_ids"], ar_tokens)
                run["equal_to_ar"] = run["first_divergence"] is None
                runs.append(run)
                print(report.progress_line(run), flush=True)

    env = _environment(args)
    summary = report.summarize(runs)
    report.write(args.out, runs, summary, env, _command(args))
    bad = [r for r in runs if r["system"].startswith("ours") and not r["equal_to_ar"]]
    print(report.markdown_table(summary))
    if bad:
        print(f"error: {len(bad)} speculative runs differ from AR: "
              + ", ".join(f"{r['variant']} @ {r['context']}" for r in bad))
        return 1
    return 0


def _run_one(v: Variant, prompt, args, cfg, verifier, tokenizer, hf_models, eos) -> dict:
    if v.system.startswith("hf"):
        assistant = hf_models[args.layers] if v.system == "hf-assisted" else None
        return hf_generate(hf_models[None], prompt, args.max_tokens, eos, assistant)
    engine_cfg = EngineConfig(model=cfg.model, drafter="same" if v.drafter == "-" else v.drafter,
                              policy="full" if v.policy == "-" else v.policy, budget=v.budget,
                              max_context=cfg.max_context, max_batch=1)
    engine, _ = build_engine(engine_cfg, verifier, tokenizer)
    mode = "ar" if v.system == "ours-ar" else "spec"
    result = engine.generate(GenerationRequest(prompt, args.max_tokens, k=max(v.k, 1), mode=mode))
    return {"token_ids": result.token_ids, **result.metrics.to_dict()}


def _warm_up(verifier, tokenizer, hf_model, prompt, eos) -> None:
    """One short run of each code path, so first-call costs do not land in a measurement."""
    engine, _ = build_engine(EngineConfig(model="-", drafter="same", policy="full", budget=None,
                                          max_context=verifier.max_context, max_batch=1),
                             verifier, tokenizer)
    engine.generate(GenerationRequest(prompt, 4, k=2, mode="spec"))
    hf_generate(hf_model, prompt, 4, eos)


def _environment(args) -> dict:
    import transformers
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "device": "cpu", "dtype": "float32", "model": args.model,
            "max_tokens": args.max_tokens, "prompts_per_context": args.prompts}


def _command(args) -> str:
    parts = ["sparsespec bench", f"--model {args.model}", f"--contexts {args.contexts}",
             f"--prompts {args.prompts}", f"--max-tokens {args.max_tokens}", f"-k {args.k}",
             f"--layers {args.layers}", f"--threads {args.threads}", f"--out {args.out}"]
    if args.quick:
        parts.append("--quick")
    return " ".join(parts)

