"""Speculation: drafting on the sparse cache, verification on the full cache, the round loop."""
