#!/usr/bin/env bash
# One short run that shows the GPU path works (docs/gpu.md): on a machine with an NVIDIA GPU it
# sets itself up as the README says, then
#   1. kernels:  tests/test_triton_kernels.py on CUDA (the Triton kernels compiled, against torch)
#   2. lossless: tests/test_device_equality.py on CUDA (greedy spec == AR: a tiny random model, SmolLM2)
#   3. capacity: `sparsespec bench capacity` in process on CUDA, GPU-sized settings
# and writes everything to one file (default gpu_check.txt), ending with a one-line verdict.
# Budget: under 8 minutes (each step has its own timeout).
#
#   scripts/gpu_check.sh [--out FILE]
#   scripts/gpu_check.sh --cpu-dry-run [--out FILE]   # same steps, torch path (kernels interpreted), tiny sizes
#
# SPARSESPEC_PYTHON=/path/to/python skips the set-up and uses that interpreter (the CI test does).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=gpu_check.txt
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "error: gpu_check: unknown argument $1 (use --cpu-dry-run, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$DRY" = 0 ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "error: gpu_check: no NVIDIA GPU here (nvidia-smi not found); --cpu-dry-run runs the same steps on the CPU" >&2
  exit 2
fi
PY="${SPARSESPEC_PYTHON:-}"
if [ -z "$PY" ]; then
  scripts/setup.sh || { echo "gpu_check: FAIL: set-up (scripts/setup.sh) failed"; exit 1; }
  PY=.venv/bin/python
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
: > "$OUT"
START=$SECONDS
FAILED=()
PASSED=0

step() {   # step NAME TIMEOUT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS rc
  echo "== $name: $*" >> "$OUT"
  timeout "$limit" "$@" >> "$OUT" 2>&1
  rc=$?
  [ "$rc" = 124 ] && echo "(timed out after ${limit}s)" >> "$OUT"
  echo "-- $name: rc=$rc, $((SECONDS - t0)) s" >> "$OUT"
  echo >> "$OUT"
  if [ "$rc" = 0 ]; then PASSED=$((PASSED + 1)); else FAILED+=("$name"); fi
}

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  export SPARSESPEC_CHECK_TOKENS=8 SPARSESPEC_CHECK_CONTEXT=200
  "$PY" -c "import sys; from sparsespec.models.testing import save_random_model, tiny_config
save_random_model(sys.argv[1], tiny_config(max_position_embeddings=512, eos_token_ids=()), seed=3)" "$WORK/tiny"
  CAPACITY=(--model "$WORK/tiny" --contexts 160 --sessions 1,2 --max-tokens 8 -k 2 --drafter-weights same --threads 1 --adaptive)
  LIMITS=(120 180 120)
  # The whole kernel file runs in the suite; here one ragged verify, the dispatch and speculation
  # on the kernels: enough to show the step's wiring in CI's time.
  KERNELS=(-k "dispatch or speculation or verify_kernel_equals_reference and rows2-3-5")
else
  DEVICE=cuda
  CAPACITY=(--model smollm2-135m --device cuda --contexts 4096,8000 --sessions 1,8,32 --max-tokens 64 -k 4
            --drafter-weights same --adaptive)
  LIMITS=(90 150 210)
  KERNELS=()
fi

{
  echo "gpu_check $( [ "$DRY" = 1 ] && echo "--cpu-dry-run " )on $(hostname), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L
  "$PY" -c "import torch, importlib.util as u; t = u.find_spec('triton'); import triton as tr
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| triton', tr.__version__)
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  echo
} >> "$OUT" 2>&1

export SPARSESPEC_TEST_DEVICE="$DEVICE" PYTHONWARNINGS=ignore
step kernels "${LIMITS[0]}" "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py "${KERNELS[@]}"
step lossless "${LIMITS[1]}" "$PY" -m pytest -q -p no:cacheprovider tests/test_device_equality.py
step capacity "${LIMITS[2]}" "$PY" -m sparsespec bench capacity "${CAPACITY[@]}" --service-cells "" --ttft-contexts "" \
  --out "$WORK/bench" --json "$WORK/capacity.json"
if [ -f "$WORK/bench/benchmarks.md" ]; then
  { echo "== capacity table"; cat "$WORK/bench/benchmarks.md"; echo; } >> "$OUT"
fi

TOTAL=$((SECONDS - START))
if [ "${#FAILED[@]}" = 0 ]; then
  VERDICT="gpu_check: PASS ($PASSED/3 steps on $DEVICE in ${TOTAL} s; results in $OUT)"
else
  VERDICT="gpu_check: FAIL (${FAILED[*]} failed; $PASSED/3 passed on $DEVICE in ${TOTAL} s; results in $OUT)"
fi
echo "$VERDICT" >> "$OUT"
echo "$VERDICT"
[ "${#FAILED[@]}" = 0 ]
