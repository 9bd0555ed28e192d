"""`sparsespec bench verify`: what one verifier forward costs, AR step against a (k+1)-token verify.

The cost model of a round is tau / (k * c_draft + c_verify) in units of an AR step, so c_verify
(a verify's time over an AR step's, same rows, same context) is one of its terms. This times the
real model's forward over a FullKVCache whose rows hold `context` entries (random K/V: the cost
does not depend on the values), for S rows at once, on the masked reference path and on the
block path (`kernels.attention.attend_block`) that the cache uses for verifies. Min / median /
max over the repetitions; outputs of the two paths are compared (max abs logit difference).

It also times the weight matmuls alone (every decoder Linear and the head, the model's own
weights) at the rows an AR step (S) and a verify (S * (k + 1)) feed them, on each CPU linear
kernel (kernels/linear.py): what the matmul part of c_verify is, and what oneDNN buys over MKL.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from kvstore.cache.full import FullKVCache
from sparsespec.kernels import linear as linear_kernel
from sparsespec.models import load_model, resolve_model


def _fill(cache: FullKVCache, context: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for k, v in zip(cache.k, cache.v):
        k[:, :, :context].copy_(torch.randn(k[:, :, :context].shape, generator=g))
        v[:, :, :context].copy_(torch.randn(v[:, :, :context].shape, generator=g))


@torch.inference_mode()
def _time(model, cache: FullKVCache, context: int, width: int, block: bool, reps: int):
    """Seconds per forward of `width` tokens on every row (each row at `context`), and the logits."""
    cache.block_verify = block
    ids = torch.randint(0, model.cfg.vocab_size, (cache.batch, width), generator=torch.Generator().manual_seed(1))
    times, logits = [], None
    for _ in range(reps + 1):                     # the first is a warm-up
        cache.lengths[:] = context
        t0 = time.perf_counter()
        logits = model(ids, cache, last_only=False)
        times.append(time.perf_counter() - t0)
    return times[1:], logits


@torch.inference_mode()
def _linears(model, rows: int, reps: int) -> list[float]:
    """Seconds per pass of `rows` rows through every weight matmul of the model (no attention)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(rows, model.cfg.hidden_size, generator=g)
    h = torch.randn(rows, model.cfg.intermediate_size, generator=g)
    heads = model.cfg.num_heads * model.layers[0].self_attn.head_dim
    o = torch.randn(rows, heads, generator=g)
    times = []
    for _ in range(reps + 1):                     # the first is a warm-up
        t0 = time.perf_counter()
        for layer in model.layers:
            layer.self_attn._packed(x)
            layer.self_attn.o_proj(o)
            layer.mlp._packed(x)
            layer.mlp.down_proj(h)
        model.lm_head(x)
        times.append(time.perf_counter() - t0)
    return times[1:]


def run_verify_cost(args) -> int:
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    model = load_model(path).eval()
    contexts = [int(c) for c in str(args.contexts).split(",")]
    sessions = [int(s) for s in str(args.sessions).split(",")]
    k, reps = args.k, args.reps
    med = statistics.median
    rows = []
    for context in contexts:
        for s in sessions:
            cache = FullKVCache.for_model(model, context + k + 1, s)
            _fill(cache, context, seed=context + s)
            ar, _ = _time(model, cache, context, 1, True, reps)
            masked, ref = _time(model, cache, context, k + 1, False, reps)
            block, out = _time(model, cache, context, k + 1, True, reps)
            row = dict(context=context, sessions=s, k=k, ar_ms=[1e3 * x for x in ar],
                       verify_masked_ms=[1e3 * x for x in masked], verify_block_ms=[1e3 * x for x in block],
                       c_verify_masked=med(masked) / med(ar), c_verify_block=med(block) / med(ar),
                       max_abs_logit_diff=float((out - ref).abs().max()))
            rows.append(row)
            print(f"context {context:5d}  S={s}  AR {1e3 * med(ar):7.1f} ms  verify k={k}: masked "
                  f"{1e3 * med(masked):7.1f} ms ({row['c_verify_masked']:.2f}x)  block {1e3 * med(block):7.1f} ms "
                  f"({row['c_verify_block']:.2f}x)  |logit diff| {row['max_abs_logit_diff']:.1e}", flush=True)
    matmuls = []
    for m in sorted({s * r for s in sessions for r in (1, k + 1)}):
        row = {"rows": m}
        for backend in linear_kernel.BACKENDS:
            old = linear_kernel.set_backend(backend)
            try:
                row[f"{backend}_ms"] = [1e3 * x for x in _linears(model, m, reps)]
            finally:
                linear_kernel.set_backend(old)
        matmuls.append(row)
        print(f"weight matmuls, {m:3d} rows: MKL (torch) {med(row['torch_ms']):6.1f} ms  oneDNN dense "
              f"{med(row['dense_ms']):6.1f} ms  oneDNN blocked (auto) {med(row['auto_ms']):6.1f} ms "
              f"({med(row['torch_ms']) / med(row['auto_ms']):.2f}x MKL)", flush=True)
    out_dir = Path(args.out) / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    record = dict(model=str(args.model), threads=args.threads, reps=reps, linear=linear_kernel.current(),
                  rows=rows, weight_matmuls=matmuls)
    (out_dir / "verify.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out_dir / 'verify.json'}")
    return 0
