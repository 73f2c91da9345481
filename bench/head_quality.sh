#!/bin/bash
# The first epoch's head against no head, equal budgets: jobs/configs/demo.yaml (3 epochs, 32,153
# training examples), head off vs a head of 3,500 examples (11 % of epoch 1, a larger share than
# the default head takes of any log it is used for: 7 % at 1M interactions), two seeds each.
#   bash bench/head_quality.sh > runs/head-quality.log 2>&1 &
# Rows: bench/results/head_quality.json (bench/quality_rows.py --out ...). Fixed run names.
cd "$(dirname "$0")/.." && mkdir -p runs
for seed in 2026 7; do
  for head in 0 3500; do
    name="demo-head$head-s$seed"
    echo "== $name $(date)"
    .venv/bin/fearec-dist train --config jobs/configs/demo.yaml --local \
      --set train.first_epoch_head=$head --set train.seed=$seed --name $name
    echo "== $name rc=$? $(date)"
    .venv/bin/python bench/quality_rows.py runs/$name --out bench/results/head_quality.json
  done
done
