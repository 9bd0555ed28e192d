"""Drafter decode step on SmolLM2, eager vs sparsespec.models.compiled.CompiledStep: PYTHONPATH=. .venv/bin/python scripts/bench_compile_step.py same 1,4"""
import os, sys, time, statistics
import torch
torch.set_num_threads(int(os.environ.get("T", "2")))
from sparsespec.models import fetch, load_model
from sparsespec.models.quant import drafter_weights
from sparsespec.models.compiled import CompiledStep
from kvstore.cache.sparse import SparseKVCache, SparseConfig
from kvstore.cache.stacked import StackedKVCache

weights = sys.argv[1] if len(sys.argv) > 1 else "same"
batches = [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "1,4").split(",")]
model = load_model(fetch("smollm2-135m", progress=False), max_context=2048).eval()
model = drafter_weights(model, weights)
g = torch.Generator().manual_seed(0)
cfg = SparseConfig(policy="chunk_topk", budget=256)

@torch.inference_mode()
def run(step, B, steps=12, reps=5):
    caches = [SparseKVCache.for_model(model, 1200, cfg) for _ in range(B)]
    for c in caches:
        model(torch.randint(0, 1000, (1, 1000), generator=g), c, last_only=True); c.upkeep(force=True)
    times = []
    ids = torch.randint(0, 1000, (B, 1), generator=g)
    outs = []
    for r in range(reps):
        t0 = time.perf_counter()
        for _ in range(steps):
            outs.append(step(ids, StackedKVCache(caches), last_only=True))
        times.append((time.perf_counter() - t0) / steps)
        for c in caches:
            c.truncate(1000)
    return statistics.median(times[1:]) * 1000, outs[0]

comp = CompiledStep(model)
for B in batches:
    t0 = time.perf_counter(); tc, oc = run(comp, B, steps=2, reps=2); first = time.perf_counter() - t0
    res = {}
    for rnd in range(2):   # interleaved
        res.setdefault("eager", []).append(run(model, B)[0])
        res.setdefault("compiled", []).append(run(comp, B)[0])
    e, c = min(res["eager"]), min(res["compiled"])
    print(f"weights={weights} B={B}: eager {e:.1f} ms/step, compiled {c:.1f} ms/step ({e/c:.2f}x), first compiled call(s) {first:.0f}s", flush=True)
