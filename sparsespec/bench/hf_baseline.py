"""transformers `generate` (AR) and assisted generation, timed like our engine: decode only.

transformers produces the first new token in its prefill forward, so decode tokens/s is
(n - 1) / (T(n tokens) - T(1 token)): the prefill is timed by a 1-token generate on the same
prompt and subtracted.
"""

from __future__ import annotations

import time

import torch


def load_hf(model_dir, num_layers: int | None = None):
    """A transformers model from our converted directory (fp32), optionally its first N layers."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    extra = {} if num_layers is None else {"num_hidden_layers": num_layers}
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a truncated copy reports the unused layers' weights
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **extra)
    finally:
        logging.set_verbosity(verbosity)
    return model.eval()


@torch.inference_mode()
def hf_generate(model, prompt: list[int], max_tokens: int, eos_ids, assistant=None) -> dict:
    ids = torch.tensor([prompt])
    kwargs = dict(do_sample=False, eos_token_id=list(eos_ids) or None, pad_token_id=0)
    if assistant is not None:
        kwargs["assistant_model"] = assistant
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, **kwargs)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_tokens, **kwargs)
    total_s = time.perf_counter() - t0
    tokens = out[0, len(prompt):].tolist()
    decode_s = max(total_s - prefill_s, 1e-9)
    return {"token_ids": tokens, "prefill_s": prefill_s, "decode_s": decode_s,
            "tokens_per_s": (len(tokens) - 1) / decode_s if len(tokens) > 1 else 0.0}
