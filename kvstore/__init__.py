"""The project's state outside the model: `kvstore.cache` holds KV tensors (the verifier's full
cache, the drafter's sparse cache, its policies, KV summaries); `kvstore.coord` holds what lives
in Redis (sessions, the committed-token log, leases, the worker registry). The two never import
each other."""
