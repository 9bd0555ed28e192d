#!/usr/bin/env bash
# Create .venv and install everything sparsespec needs, pinned. Idempotent: a second run is quick.
# torch goes first so that nothing later pulls a multi-GB CUDA build onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# The services keep sessions in Redis: redis-server must be on PATH.
if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
  else
    echo "setup: please install redis-server (https://redis.io/docs/install/)" >&2
    exit 1
  fi
fi
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.sparsespec-installed
want="$(cat requirements/*.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install --quiet --upgrade pip
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install --quiet torch==2.13.0
  fi
  python -m pip install --quiet -r requirements/dev.txt
  python -m pip install --quiet --no-deps -e .
  echo "$want" > "$stamp"
fi
