#!/usr/bin/env bash
# Regenerate the committed gRPC stubs in sparsespec/rpc/ from proto/. tests/test_protos.py fails
# when the committed stubs differ from what this script produces.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-sparsespec/rpc}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m grpc_tools.protoc -I proto --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  proto/sparsespec/v1/*.proto
# protoc writes sparsespec/v1/*_pb2.py under OUT with absolute imports "from sparsespec.v1 import";
# make them package-relative to sparsespec.rpc.
find "$OUT/sparsespec" -name '*.py' -o -name '*.pyi' | while read -r f; do
  sed -i 's/^from sparsespec\.v1 import/from sparsespec.rpc.sparsespec.v1 import/' "$f"
done
touch "$OUT/__init__.py" "$OUT/sparsespec/__init__.py" "$OUT/sparsespec/v1/__init__.py"
