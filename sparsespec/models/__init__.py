"""Llama-family models (Llama 2/3, Mistral, Qwen2, SmolLM2) and Gemma 3: config, models, loaders, named models."""

from sparsespec.models.config import ModelConfig
from sparsespec.models.gemma3 import Gemma3Model
from sparsespec.models.llama import LlamaModel
from sparsespec.models.loader import convert_gguf_to_dir, load_config, load_model, load_tokenizer, save_model
from sparsespec.models.registry import fetch, known_models, resolve_model

__all__ = ["ModelConfig", "LlamaModel", "Gemma3Model", "load_model", "load_tokenizer", "load_config", "save_model",
           "convert_gguf_to_dir", "fetch", "known_models", "resolve_model"]
