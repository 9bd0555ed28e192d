"""Coordination in Redis: sessions with their committed-token log, turns and leases
(`sessions.py`), the worker registry (`registry.py`), and the connection policy both share
(`connection.py`). Nothing here knows about KV tensors (those are `kvstore.cache`)."""
