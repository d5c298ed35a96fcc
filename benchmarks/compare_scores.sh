#!/usr/bin/env bash
# Scores of the same selections from two source trees: REV (default 1f8f403^, before the
# issue-14 redesign) and HEAD, on small demo data. Usage: benchmarks/compare_scores.sh [REV]
set -uo pipefail
cd "$(dirname "$0")/.."
REV="${1:-1f8f403^}" D="${OUT:-/tmp/finesift-compare}"; OLD=$D/old NEW=$D/new
rm -rf $D; mkdir -p $OLD $NEW $D/data
git archive "$REV" src | tar -x -C $OLD
git archive HEAD src | tar -x -C $NEW
git rev-parse HEAD > $D/new-rev
PYTHONPATH=$NEW/src .venv/bin/python -c "
from pathlib import Path
from finesift.bundled import build_demo_data
print(build_demo_data(Path('$D/data'), n_target=16, n_gsm8k_pool=12, n_sharegpt=28, seed=0))"
for m in dsir embed perplexity uncertainty tov less; do
  for side in old new; do
    src=$OLD; [ $side = new ] && src=$NEW
    echo "== $m $side $(date +%T)"
    PYTHONPATH=$src/src /usr/bin/time -f "%e s %M KB" .venv/bin/finesift select \
      --pool $D/data/pool_sharegpt.jsonl $D/data/pool_gsm8k.jsonl --target $D/data/target_gsm8k.jsonl \
      --budget 10 --method $m --out $D/run-$m-$side --no-progress > $D/log-$m-$side 2>&1
    tail -2 $D/log-$m-$side
  done
  .venv/bin/python - <<PY
import pyarrow.parquet as pq, numpy as np
a = pq.read_table("$D/run-$m-old/scores.parquet").to_pandas()
b = pq.read_table("$D/run-$m-new/scores.parquet").to_pandas()
print("$m", "ids equal:", list(a["id"]) == list(b["id"]), "max |diff|:",
      float(np.max(np.abs(a["score"].to_numpy() - b["score"].to_numpy()))),
      "identical:", bool(np.array_equal(a["score"].to_numpy(), b["score"].to_numpy())))
PY
done
