"""The matmul of every inference Linear, and the one place that picks its kernel.

A decode step on a CPU spends most of its time in weight matmuls of 1-40 rows (an AR step, a
(k+1)-token verify, a batched draft). PyTorch's fp32 `F.linear` runs MKL sgemm there; oneDNN's
inner product (`mkldnn::_linear_pointwise`, the op PyTorch's own compiler emits for CPU linears)
reads the same dense fp32 weight 1.8-2.3x faster at those sizes on this project's CPU (docs/
benchmarks.md, "CPU matmul kernel"), with no copy of the weight. Same math, another summation
order: outputs agree to fp32 rounding.

Backend (`SPARSESPEC_LINEAR` or `set_backend`): "auto" takes oneDNN for fp32 CPU tensors when
autograd is off and PyTorch was built with it, torch's `F.linear` otherwise (training, CUDA,
bf16, whose CPU `F.linear` is oneDNN already); "torch" forces `F.linear`.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKENDS = ("auto", "torch")


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"SPARSESPEC_LINEAR must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


_backend = _checked(os.environ.get("SPARSESPEC_LINEAR", "auto"))
_ONEDNN = torch.backends.mkldnn.is_available()


def set_backend(name: str) -> str:
    """Force the linear backend ("auto" or "torch"). Returns the old one."""
    global _backend
    old, _backend = _backend, _checked(name)
    return old


def current() -> str:
    return _backend


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., in], weight: [out, in], bias: [out] or None -> [..., out]."""
    if (_backend == "auto" and _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_grad_enabled()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict keys) whose inference matmul is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
