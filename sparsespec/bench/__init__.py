"""Benchmarks: our AR and speculative decoding against transformers, in one process, same prompts."""
