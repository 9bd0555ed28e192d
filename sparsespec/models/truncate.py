"""The `layers:N` drafter: the verifier's first N layers + final norm + head, sharing its weights."""

from __future__ import annotations

import torch
import torch.nn as nn

from sparsespec.errors import InvalidArgument
from sparsespec.models.llama import LlamaModel


def layer_truncated(model: LlamaModel, num_layers: int) -> LlamaModel:
    """A drafter that costs no extra weight memory: every module is the verifier's own."""
    if not 1 <= num_layers <= model.cfg.num_layers:
        raise InvalidArgument("drafter", f"layers:{num_layers} must be in [1, {model.cfg.num_layers}]")
    with torch.device("meta"):
        view = type(model)(model.cfg.truncated(num_layers), model.max_context)  # LlamaModel or Gemma3Model
    view.embed_tokens = model.embed_tokens
    view.layers = nn.ModuleList(model.layers[:num_layers])
    view.norm = model.norm
    view.lm_head = model.lm_head
    view._kv_source = model.kv_source
    return view
