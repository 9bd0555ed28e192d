"""The matmul of every inference Linear, and the one place that picks its kernel.

A decode step on a CPU spends most of its time in weight matmuls of 1-40 rows (an AR step, a
(k+1)-token verify, a batched draft). PyTorch's fp32 `F.linear` runs MKL sgemm there; oneDNN's
inner product (`mkldnn::_linear_pointwise`, the op PyTorch's own compiler emits for CPU linears)
reads the same dense fp32 weight 1.7-2.2x faster at those sizes on this project's CPU (docs/
benchmarks.md, "CPU matmul kernel"), with no copy of the weight. Same math, another summation
order: outputs agree to fp32 rounding.

oneDNN builds (JIT-compiles) and caches one primitive per input shape, ~0.6 MB each: a server
whose row counts vary (every prompt length of a prefill) grew its RSS by 650 MB over 1,000
shapes, and a chaos-test drafter by 133 MB between two rounds. So only ROW_BUCKETS rows take it,
each call's rows padded with zeros up to the next bucket (a bounded set of primitives: 12 per
weight shape, all built at the shape's first call, so a process's memory settles at once; the
padded rows cost little, since a few more rows barely add to reading the weight); more rows (a
prefill, where GEMM is efficient anyway) take `F.linear`.

oneDNN reads the weight fastest in its own blocked layout: a copy reordered for a few rows
(`mkldnn._reorder_linear_weight`, what PyTorch's compiler freezes a CPU linear's weight into)
takes 5 rows at the cost of 1 where the dense weight took 1.3x (SmolLM2-135M, 2 threads: every
weight matmul at 1 / 5 / 8 / 40 rows in 13.9 / 13.7 / 15.5 / 32.1 ms, dense 14.8 / 19.4 / 22.0 /
44.2 ms), so a (k+1)-token verify's matmuls cost what an AR step's do. The copy is made at a
weight's first call and kept beside it (`_blocked`): the dense weight stays the parameter
(prefill, training, the quantized copies read it), so fp32 CPU weights take twice their memory.
A weight changed in place or re-pointed since is reordered again; a weight created under
inference mode (no version counter to tell) uses the dense path.

What oneDNN buys is reading a weight that does not fit in cache; each call also costs ~15-25 us
more than `F.linear`'s ~4 us. A weight under MIN_WEIGHT elements stays in cache, where that
overhead is the whole cost (a 64 x 64 matmul ran 10x slower): small models, such as the tests'
tiny random ones, keep `F.linear`. SmolLM2-135M's smallest decoder weight is 576 x 576.

Backend (`SPARSESPEC_LINEAR` or `set_backend`): "auto" takes oneDNN over the blocked copy for fp32
CPU tensors of at most ROW_BUCKETS[-1] rows and weights of at least MIN_WEIGHT elements when
autograd is off and PyTorch was built with it, torch's `F.linear` otherwise (prefill, training,
CUDA, bf16, whose CPU `F.linear` is oneDNN already); "dense" is oneDNN over the dense weight (no
copy: half the weight memory); "torch" forces `F.linear`.
"""

from __future__ import annotations

import bisect
import os
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKENDS = ("auto", "dense", "torch")
ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)   # rows a oneDNN call is padded to
BLOCK_ROWS = 8            # the row count the blocked copy is laid out for (1: 1.3x slower at 5-40 rows)
MIN_WEIGHT = 1 << 18      # weight elements (1 MiB fp32) below which F.linear is faster


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"SPARSESPEC_LINEAR must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


_backend = _checked(os.environ.get("SPARSESPEC_LINEAR", "auto"))
_ONEDNN = torch.backends.mkldnn.is_available()
_built: set[tuple[int, int, bool, bool]] = set()   # (out, in, bias, blocked) whose bucket primitives exist
# id(weight) -> (weakref to it, its data_ptr and version when reordered, the blocked copy)
_blocked: dict[int, tuple[weakref.ref, int, int, torch.Tensor]] = {}


def set_backend(name: str) -> str:
    """Force the linear backend (one of BACKENDS). Returns the old one."""
    global _backend
    old, _backend = _backend, _checked(name)
    return old


def current() -> str:
    return _backend


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., in], weight: [out, in], bias: [out] or None -> [..., out]."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (_backend == "torch" or not _ONEDNN or not 0 < rows <= ROW_BUCKETS[-1] or weight.numel() < MIN_WEIGHT
            or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or torch.is_grad_enabled()):
        return F.linear(x, weight, bias)
    blocked = _backend == "auto" and not weight.is_inference()
    if blocked:
        weight = _blocked_copy(weight)
    shape = (*weight.shape, bias is not None, blocked)
    if shape not in _built:
        _built.add(shape)
        for b in ROW_BUCKETS:
            _onednn(x.new_zeros(b, x.shape[-1]), weight, bias)
    bucket = ROW_BUCKETS[bisect.bisect_left(ROW_BUCKETS, rows)]
    flat = x.reshape(rows, x.shape[-1])                                   # [rows, in]
    if bucket != rows:
        flat = torch.cat([flat, flat.new_zeros(bucket - rows, x.shape[-1])])   # [bucket, in]
    out = _onednn(flat, weight, bias)                                     # [bucket, out]
    return out[:rows].reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict keys) whose inference matmul is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _blocked_copy(weight: torch.Tensor) -> torch.Tensor:
    """The weight reordered into oneDNN's blocked layout, made once and reused while the weight is
    the same tensor with the same data (a weight changed in place or re-pointed gets a new copy)."""
    key, ptr, version = id(weight), weight.data_ptr(), weight._version
    kept = _blocked.get(key)
    if kept is not None and kept[0]() is weight and kept[1] == ptr and kept[2] == version:
        return kept[3]
    copy = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BLOCK_ROWS)
    _blocked[key] = (weakref.ref(weight, lambda _, key=key: _blocked.pop(key, None)), ptr, version, copy)
    return copy
