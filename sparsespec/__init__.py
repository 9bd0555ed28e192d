"""sparsespec: disaggregated speculative decoding with a sparse-KV drafter and a full-KV verifier."""

__version__ = "0.1.0"
