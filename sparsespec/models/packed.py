"""Several Linear layers on the same input as one matmul (q/k/v, gate/up).

Decoding on a CPU or a small GPU is bound by reading weights; one GEMV over the stacked matrix
saves the launches and passes of three. The stacked weight is built once, and the layers'
parameters' data are then re-pointed to views of it, so no memory is duplicated and an in-place update
of a parameter (an optimizer step, `load_state_dict`) is seen by the packed matmul. When a
parameter is replaced by a new tensor (`load_state_dict(assign=True)`), the pack is rebuilt.

With autograd on (training), the layers run separately so gradients reach their own parameters.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sparsespec.kernels.linear import linear


class PackedLinear:
    """Not a Module: it owns no parameters, only a view over the layers' (kept out of state_dict)."""

    def __init__(self, *linears: nn.Linear):
        self.linears = linears
        self._weight: torch.Tensor | None = None   # [sum(out), in]
        self._bias: torch.Tensor | None = None     # [sum(out)] or None
        self._versions: tuple[int, ...] = ()        # the parameters' versions when packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., sum(out)], the layers' outputs concatenated in order."""
        if torch.is_grad_enabled() and any(l.weight.requires_grad for l in self.linears):
            return torch.cat([l(x) for l in self.linears], dim=-1)
        if not self._is_current():
            self._pack()
        return linear(x, self._weight, self._bias)

    def _is_current(self) -> bool:
        w = self._weight
        if w is None or w.device != self.linears[0].weight.device or w.dtype != self.linears[0].weight.dtype:
            return False
        b = self._bias
        if (b is None) != (self.linears[0].bias is None):
            return False
        row, size = 0, w.element_size()
        for l in self.linears:
            if l.weight.data_ptr() != w.data_ptr() + row * w.stride(0) * size:
                return False
            if b is not None and l.bias.data_ptr() != b.data_ptr() + row * size:
                return False
            row += l.weight.shape[0]
        return self._versions == self._versions_now()

    def _versions_now(self) -> tuple[int, ...]:
        """An in-place update of a parameter (its data a view of the stack) bumps the parameter's
        version, not the stack's: the stack is rebuilt then, so what reads the stack by identity
        and version (kernels/linear.py's blocked copy) sees the update."""
        return tuple(p._version for l in self.linears for p in (l.weight, l.bias) if p is not None)

    @torch.no_grad()
    def _pack(self) -> None:
        # Outside inference mode even when the first call is inside it: the stacked weight is the
        # parameters' storage from now on, and it keeps a version counter (kernels/linear.py
        # reorders a weight again when it changes in place; an inference tensor has none).
        with torch.inference_mode(False):
            self._weight = torch.cat([l.weight for l in self.linears], dim=0)
            has_bias = self.linears[0].bias is not None
            self._bias = torch.cat([l.bias for l in self.linears]) if has_bias else None
        row = 0
        for l in self.linears:
            n = l.weight.shape[0]
            # Re-point the data, not the Parameter: an optimizer (or anyone) holding the Parameter
            # object keeps updating exactly what the packed matmul reads.
            l.weight.data = self._weight[row:row + n]
            if has_bias:
                l.bias.data = self._bias[row:row + n]
            row += n
        self._versions = self._versions_now()
