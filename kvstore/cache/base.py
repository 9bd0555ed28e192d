"""The contract between a model and its KV cache.

The model never knows whether its cache is sparse or full: for every forward it asks the cache
for the positions of the new tokens, hands each layer's rotated q/k/v to `attend`, and closes the
forward with `end_forward`. Which past entries a layer sees is the cache's business.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class KVCache(ABC):
    """Abstract KV cache over a batch of sequences (rows)."""

    @abstractmethod
    def begin_forward(self, num_new: int) -> torch.Tensor:
        """Start a forward of `num_new` tokens per row; returns their positions, [B, T] int64."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this layer's new k/v and attend.

        q: [B, H, T, D] (rotary applied), k/v: [B, Hkv, T, D] (rotary applied).
        Returns [B, H, T, D]: softmax(q K^T / sqrt(D)) V over the entries this cache keeps for
        `layer` plus the new tokens, causally.
        """

    @abstractmethod
    def end_forward(self) -> None:
        """Commit the forward: every row's length grows by T."""

    @abstractmethod
    def device_bytes(self) -> int:
        """Exact bytes of KV tensors held on the compute device."""

    def host_bytes(self) -> int:
        """Exact bytes of KV tensors held in the host tier (CPU RAM)."""
        return 0
