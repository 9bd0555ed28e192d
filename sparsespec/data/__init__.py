"""Real public-domain text, fetched offline-friendly from PyPI wheels."""
