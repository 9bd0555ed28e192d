#!/usr/bin/env bash
# The CPU comparison of docs/training.md: four variants of the CPU preset (same windows, steps and
# sequence length; they differ only in objective and views), then speculative decoding with each
# on held-out 4K prompts. One thread each, one after another. Checkpoints go to $RUNS (not in git).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-/work/runs/budgetdraft}
SS=".venv/bin/sparsespec"
mkdir -p "$RUNS" docs/train
$SS train --teacher-only --threads 1                                     # verifier targets, once
for v in "paper:--objective hard --lam 0.5" "soft:--objective tv --lam 0.5" \
         "a-only:--objective hard --lam 0" "control:--objective lm --lam 0"; do
  name=${v%%:*}; flags=${v#*:}
  /usr/bin/time -f "$name wall %e s" $SS train --out "$RUNS/$name" --threads 1 --resume $flags \
      > "$RUNS/$name.log" 2>&1
  cp "$RUNS/$name/summary.json" "docs/train/summary_$name.json"
done
$SS train eval --threads 1 --context 4096 --prompts 3 --max-tokens 48 -k 4 --out docs/train/eval_cpu.json \
    --variants "untrained=layers:4,a-only=$RUNS/a-only/checkpoint-200,paper=$RUNS/paper/checkpoint-200,soft=$RUNS/soft/checkpoint-200,control=$RUNS/control/checkpoint-200" \
    > "$RUNS/eval.log" 2>&1
