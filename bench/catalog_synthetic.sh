#!/bin/bash
# Issue 16's large-vocabulary quality check: a synthetic log whose vocabulary holds >= 10^6 items
# (100,000 users x 4,000,000 synthetic items: 3,495,192 interactions, 1,104,585 distinct items),
# SASRec with the sampled softmax and sparse item updates for 2 epochs, then the trained model and
# the popularity ranking on the same seeded sample of 10,000 test users (`--users 10000 --seed 2026`:
# sample_users draws 10,000 of the user ids without replacement from a generator seeded [2026, 41]).
# No evaluation inside the run (the test pass would score all 100,000 users against 1.1M items: ~30 min here).
#   bash bench/catalog_synthetic.sh > runs/catalog-synthetic.log 2>&1 &
# Smoke test at a small size (OUT keeps bench/results as it is):
#   USERS=2000 ITEMS=20000 NAME=smoke DATA=runs/_prepared/smoke OUT=runs/smoke.json bash bench/catalog_synthetic.sh
# Writes bench/results/catalog_synthetic.json (bench/catalog_synthetic_rows.py).
set -e
cd "$(dirname "$0")/.." && mkdir -p runs
USERS=${USERS:-100000}; ITEMS=${ITEMS:-4000000}; NAME=${NAME:-sasrec-synthetic-4m-sampled-sparse}
DATA=${DATA:-runs/_prepared/synthetic-4m-items}
[ -f $DATA/meta.json ] || .venv/bin/fearec-dist prepare --format synthetic --output $DATA \
  --set data.synthetic_users=$USERS --set data.synthetic_items=$ITEMS
.venv/bin/fearec-dist train --config jobs/configs/demo.yaml --local --data $DATA \
  --set data.format=prepared --set data.max_seq_len=${L:-20} --set model.name=sasrec \
  --set train.epochs=2 --set train.batch_size=256 --set train.softmax=sampled \
  --set train.n_negatives=1024 --set train.negative_sampler=popularity \
  --set train.sparse_item_updates=true --set train.evaluate=false --set train.seed=2026 \
  --set run.workers=2 --set run.cpus_per_worker=1.0 --name $NAME
echo "== evaluate the model"
.venv/bin/fearec-dist evaluate --checkpoint runs/$NAME --users 10000 --seed 2026 --json \
  | tee runs/$NAME/eval-model.json
echo "== evaluate popularity"
.venv/bin/fearec-dist evaluate --baseline popularity --data $DATA --max-seq-len ${L:-20} \
  --users 10000 --seed 2026 --json | tee runs/$NAME/eval-popularity.json
.venv/bin/python bench/catalog_synthetic_rows.py --run runs/$NAME --data $DATA \
  ${OUT:+--out $OUT}
