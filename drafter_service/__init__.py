"""The drafter service: many sessions' sparse-KV drafters over one model, behind gRPC."""
