#!/usr/bin/env bash
# Short learning-rate sweeps for the fine-tuning recipes, scored on held-out TRAINING rows (never on the reported
# validation/test split). Usage: scripts/finetune_lr_sweep.sh text|vision [OUT=runs/sweep]
# Each run writes OUT/<recipe>-<method>-<lr>/results.json; results/finetune/sweep/ holds the committed copies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${2:-runs/sweep}
run() { [ -f "$OUT/$1/results.json" ] || $PY "${@:2}" --output "$OUT/$1"; }
case "$1" in
text)  # 300 steps on the first 60,000 training rows, scored on training rows 60,000-62,000
  for m_lr in head:3e-3 head:1e-2 head:3e-2 lora:1e-3 lora:3e-3; do m=${m_lr%:*}; lr=${m_lr#*:}
    run "text-$m-$lr" recipes/finetune_text.py --method "$m" --lr "$lr" --max-steps 300 \
      --train-split "train[:60000]" --eval-split "train[60000:62000]"
  done ;;
vision)  # one epoch on the first 10,000 training images at 64 px, scored on training images 45,000-47,000
  for m_lr in norm:3e-3 norm:1e-2 norm:3e-2 head:3e-3 head:1e-2 head:3e-2 bitfit:1e-2 bitfit:3e-2 \
              lora:1e-3 lora:3e-3 full:3e-4 full:1e-3; do m=${m_lr%:*}; lr=${m_lr#*:}
    run "vision-$m-$lr" recipes/finetune_vision.py --method "$m" --lr "$lr" \
      --train-split "train[:10000]" --eval-split "train[45000:47000]"
  done ;;
*) echo "usage: $0 text|vision [OUT]" >&2; exit 2 ;;
esac
