"""Llama-family models (Llama 2/3, Mistral, Qwen2, SmolLM2): config, model, loaders, named models."""

from sparsespec.models.config import ModelConfig
from sparsespec.models.llama import LlamaModel
from sparsespec.models.loader import convert_gguf_to_dir, load_config, load_model, load_tokenizer, save_model
from sparsespec.models.registry import fetch, known_models, resolve_model

__all__ = ["ModelConfig", "LlamaModel", "load_model", "load_tokenizer", "load_config", "save_model",
           "convert_gguf_to_dir", "fetch", "known_models", "resolve_model"]
