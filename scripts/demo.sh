#!/usr/bin/env bash
# The main job, from a fresh machine: set up, fetch SmolLM2-135M, run the long-context demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/sparsespec demo "$@"
