#!/usr/bin/env bash
# Scores of the same selections from two source trees: REV (default 1f8f403^, before the
# issue-14 redesign) and HEAD, on small demo data; then a 2-shard run plus merge of
# SHARD_METHOD (default embed; dsir cannot shard) on each side. Usage: benchmarks/compare_scores.sh [REV]
# METHODS="tov less" limits the plain runs; OUT sets the work folder; LESS_OPTS the options
# of the less run (default "-o projection=sparse", the CPU setting the suites use: the
# dense default costs about 25 min a side here).
set -uo pipefail
cd "$(dirname "$0")/.."
REV="${1:-1f8f403^}" D="${OUT:-/tmp/finesift-compare}"; OLD=$D/old NEW=$D/new
METHODS="${METHODS-dsir embed perplexity uncertainty tov less}"
SHARD_METHOD="${SHARD_METHOD-embed}"
LESS_OPTS="${LESS_OPTS:--o projection=sparse}"
rm -rf $D; mkdir -p $OLD $NEW $D/data
git archive "$REV" src | tar -x -C $OLD
git archive HEAD src | tar -x -C $NEW
git rev-parse HEAD > $D/new-rev
PYTHONPATH=$NEW/src .venv/bin/python -c "
from pathlib import Path
from finesift.bundled import build_demo_data
print(build_demo_data(Path('$D/data'), n_target=16, n_gsm8k_pool=12, n_sharegpt=28, seed=0))"
POOL="$D/data/pool_sharegpt.jsonl $D/data/pool_gsm8k.jsonl" TARGET=$D/data/target_gsm8k.jsonl

compare() {  # compare NAME: the scores.parquet of run-NAME-old and run-NAME-new
  .venv/bin/python - <<PY
import pyarrow.parquet as pq, numpy as np
a = pq.read_table("$D/run-$1-old/scores.parquet").to_pandas()
b = pq.read_table("$D/run-$1-new/scores.parquet").to_pandas()
print("$1", "ids equal:", list(a["id"]) == list(b["id"]), "max |diff|:",
      float(np.max(np.abs(a["score"].to_numpy() - b["score"].to_numpy()))),
      "identical:", bool(np.array_equal(a["score"].to_numpy(), b["score"].to_numpy())))
PY
}

for m in $METHODS; do
  opts=""; [ $m = less ] && opts=$LESS_OPTS
  for side in old new; do
    src=$OLD; [ $side = new ] && src=$NEW
    echo "== $m $side $(date +%T)"
    PYTHONPATH=$src/src /usr/bin/time -f "%e s %M KB" .venv/bin/finesift select \
      --pool $POOL --target $TARGET --budget 10 --method $m $opts --out $D/run-$m-$side \
      --no-progress > $D/log-$m-$side 2>&1
    tail -2 $D/log-$m-$side
  done
  compare $m
done

m=$SHARD_METHOD
[ -z "$m" ] && exit 0
for side in old new; do
  src=$OLD; [ $side = new ] && src=$NEW
  echo "== $m, 2 shards + merge, $side $(date +%T)"
  for i in 0 1; do
    PYTHONPATH=$src/src .venv/bin/finesift select --pool $POOL --target $TARGET --method $m \
      --num-shards 2 --shard-index $i \
      --out $D/shard-$m-$side-$i --no-progress > $D/log-shard-$m-$side-$i 2>&1
    tail -1 $D/log-shard-$m-$side-$i
  done
  PYTHONPATH=$src/src .venv/bin/finesift merge --budget 10 --out $D/run-merged-$m-$side \
    $D/shard-$m-$side-0 $D/shard-$m-$side-1 > $D/log-merge-$m-$side 2>&1
  tail -1 $D/log-merge-$m-$side
done
compare merged-$m
