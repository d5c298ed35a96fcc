#!/usr/bin/env bash
# The same selection three ways on one pool, one after the other in one run: fp32
# (--precision fp32), bf16 autocast (--precision bf16: fp32 weights, bf16 matmuls; what
# --precision auto does on a CPU with fast bf16) and bf16 weights (--dtype bf16: no
# autocast, no casts). Prints each run's wall seconds and, against the fp32 run, the
# Spearman correlation of the scores and the overlap of the top 10% and 25%.
#
# Usage: benchmarks/dtype_agreement.sh [METHOD ...]      (default: perplexity uncertainty)
# Pool: the instruct-gsm8k suite's (the first 150 ShareGPT turns and 50 GSM8K problems of
# benchmarks/data, built by `finesift bench-data instruct-gsm8k --out benchmarks/data`);
# target: its 64 val problems. OUT sets the work folder (default /tmp/finesift-dtype).
set -euo pipefail
cd "$(dirname "$0")/.."
METHODS=("${@:-perplexity}")
[ $# -eq 0 ] && METHODS=(perplexity uncertainty)
D="${OUT:-/tmp/finesift-dtype}"
DATA=benchmarks/data
for f in sharegpt.jsonl gsm8k_pool.jsonl gsm8k_val.jsonl; do
  [ -f "$DATA/$f" ] || { echo "$DATA/$f missing: finesift bench-data instruct-gsm8k --out $DATA" >&2; exit 2; }
done
mkdir -p "$D"
head -n 150 "$DATA/sharegpt.jsonl" > "$D/pool_sharegpt.jsonl"
head -n 50 "$DATA/gsm8k_pool.jsonl" > "$D/pool_gsm8k.jsonl"
FS=(.venv/bin/finesift select --pool "$D/pool_sharegpt.jsonl" "$D/pool_gsm8k.jsonl"
    --target "$DATA/gsm8k_val.jsonl" --budget 50 --max-length 256 --batch-size auto
    --no-progress -q)
for m in "${METHODS[@]}"; do
  for way in fp32 autocast weights; do
    case $way in
      fp32) flags=(--precision fp32 --dtype fp32) ;;
      autocast) flags=(--precision bf16 --dtype fp32) ;;
      weights) flags=(--precision fp32 --dtype bf16) ;;
    esac
    out="$D/$m-$way"
    rm -rf "$out"
    t0=$(date +%s.%N)
    "${FS[@]}" --method "$m" "${flags[@]}" --out "$out" --workdir "$out-work" > /dev/null
    t1=$(date +%s.%N)
    awk -v m="$m" -v w="$way" -v a="$t0" -v b="$t1" 'BEGIN { printf "%s %s: %.1f s\n", m, w, b - a }'
  done
  .venv/bin/python benchmarks/score_agreement.py "$D/$m-fp32" "$D/$m-autocast" "$D/$m-weights" \
    --shares 0.1 0.25 --out "$D/$m-agreement.json"
done
