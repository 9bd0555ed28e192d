"""`sparsespec train` (BudgetDraft training) and `sparsespec train eval` (the comparison).

Heavy imports live inside the handlers, so `sparsespec --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparsespec.errors import InvalidArgument


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a budget-robust drafter (BudgetDraft); `train eval` compares drafters",
                       description="Train a drafter on the verifier's full-cache targets through full and sparse "
                                   "KV views. Flags left unset take the preset's value.")
    p.add_argument("action", nargs="?", default="run", choices=("run", "eval", "report"),
                   help="run: train (default); eval: speculative decoding per variant and budget; "
                        "report: markdown tables from --eval-json and --summaries")
    p.add_argument("--preset", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--out", help="run directory (checkpoints, summary.json); eval: the results JSON")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--teacher-only", action="store_true", help="compute the teacher targets and stop")
    p.add_argument("--teacher-cache", help="where teacher targets are kept (default $SPARSESPEC_HOME/teacher)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for name, kind in (("verifier", str), ("drafter", str), ("data", str), ("heldout-docs", int),
                       ("prefix", int), ("continuation", int), ("windows", int), ("heldout-windows", int),
                       ("steps", int), ("lr", float), ("min-lr-ratio", float), ("weight-decay", float),
                       ("warmup", int), ("grad-clip", float), ("objective", str), ("lam", float),
                       ("views-per-step", int), ("policy", str), ("top-k", int), ("seed", int),
                       ("device", str), ("threads", int), ("save-every", int), ("eval-every", int)):
        p.add_argument(f"--{name}", type=kind, default=None)
    p.add_argument("--budgets", help="BUDGET:WEIGHT,... sparse views' budget distribution")
    p.add_argument("--train-embeddings", action="store_true", help="also train the embeddings and head")
    e = p.add_argument_group("eval")
    e.add_argument("--variants", help="NAME=CHECKPOINT_DIR|layers:N,... (the held-out split comes from the "
                                      "first checkpoint's train_config.json)")
    e.add_argument("--context", type=int, default=4096, help="prompt tokens")
    e.add_argument("--prompts", type=int, default=3)
    e.add_argument("--max-tokens", type=int, default=48)
    e.add_argument("-k", type=int, default=4)
    r = p.add_argument_group("report")
    r.add_argument("--eval-json", help="a `train eval` results file")
    r.add_argument("--summaries", nargs="*", default=[], help="summary_<name>.json files of runs")


def _config(args):
    from sparsespec.train.config import PRESETS, parse_budgets

    fields = ("verifier", "drafter", "data", "heldout_docs", "prefix", "continuation", "windows",
              "heldout_windows", "steps", "lr", "min_lr_ratio", "weight_decay", "warmup", "grad_clip",
              "objective", "lam", "views_per_step", "policy", "top_k", "seed", "device", "threads",
              "save_every", "eval_every")
    changes = {f: getattr(args, f) for f in fields}
    if args.budgets is not None:
        changes["budgets"] = parse_budgets(args.budgets)
    if args.train_embeddings:
        changes["freeze_embeddings"] = False
    return PRESETS[args.preset].with_overrides(**changes)


def run(args) -> int:
    if args.action == "eval":
        return _run_eval(args)
    if args.action == "report":
        return _run_report(args)
    cfg = _config(args)                          # field errors here, before anything is loaded
    if not args.out and not args.teacher_only:
        raise InvalidArgument("out", "a run directory is required (--out DIR)")
    import torch

    from sparsespec.train.prepare import plan
    from sparsespec.train.trainer import Trainer
    from sparsespec.wheels import home

    torch.set_num_threads(cfg.threads)
    p = plan(cfg)                                # models, vocabularies, data, windows: still no compute
    trainer = Trainer(p, Path(args.out or "."), Path(args.teacher_cache or home() / "teacher"),
                      progress=not args.quiet)
    if args.teacher_only:
        trainer.prepare_targets()
        return 0
    summary = trainer.run(resume=args.resume)
    last = summary["history"][-1].get("heldout", {})
    print(json.dumps({"checkpoint": summary["checkpoint"], "wall_s": summary["wall_s"], "heldout": last}))
    return 0


def _run_eval(args) -> int:
    if not args.variants:
        raise InvalidArgument("variants", "name at least one NAME=CHECKPOINT_DIR|layers:N")
    if not args.out:
        raise InvalidArgument("out", "a results file is required (--out FILE.json)")
    specs = {}
    for part in filter(None, (s.strip() for s in args.variants.split(","))):
        name, sep, spec = part.partition("=")
        if not sep or not name or not spec:
            raise InvalidArgument("variants", f"expected NAME=SPEC, got {part!r}")
        specs[name] = spec
    for name in ("context", "prompts", "max_tokens", "k"):
        if getattr(args, name) < 1:
            raise InvalidArgument(name.replace("_", "-"), f"must be >= 1, got {getattr(args, name)}")
    from sparsespec.train.evaluate import evaluate
    result = evaluate(specs, args.context, args.prompts, args.max_tokens, args.k,
                      threads=args.threads or 1, progress=not args.quiet)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({v: {b: (c["alpha"], c["tau"], c["sd_equals_ar"]) for b, c in cells.items()}
                      for v, cells in result["cells"].items()}))
    return 0 if all(c["sd_equals_ar"] for cells in result["cells"].values() for c in cells.values()) else 1


def _run_report(args) -> int:
    paths = [Path(p) for p in args.summaries] + ([Path(args.eval_json)] if args.eval_json else [])
    if not paths:
        raise InvalidArgument("summaries", "name --summaries FILES and/or --eval-json FILE")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise InvalidArgument("eval-json" if str(missing[0]) == args.eval_json else "summaries",
                              f"{missing[0]} does not exist")
    from sparsespec.train.report import render
    print(render(Path(args.eval_json) if args.eval_json else None, [Path(p) for p in args.summaries]))
    return 0
