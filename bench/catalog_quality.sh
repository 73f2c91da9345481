#!/bin/bash
# Quality of the sampled softmax on Amazon Beauty, same 10-epoch budget as bench/beauty_quality.sh:
# SASRec full vs sampled (1,024 popularity negatives + in-batch + logQ), two seeds each, and FEARec
# sampled, one seed (its full row is bench/beauty_quality.sh's). Fixed run names: rerunning resumes.
# The seed-2026 SASRec full run is bench/beauty_quality.sh's sasrec-beauty-10ep (same config).
#   bash bench/catalog_quality.sh > runs/catalog-quality.log 2>&1 &
# Runs already recorded in bench/results/beauty_quality.json are skipped (runs/ may not survive).
cd "$(dirname "$0")/.." && mkdir -p runs
SAMPLED="--set train.softmax=sampled --set train.n_negatives=1024 --set train.negative_sampler=popularity"
for spec in "sasrec 2026 sampled" "sasrec 7 sampled" "sasrec 7 full" "fearec_official 2026 sampled"; do
  set -- $spec
  name="$1-beauty-10ep-$3-s$2"
  extra=""; [ "$3" = sampled ] && extra="$SAMPLED"
  if grep -q "\"run\": \"$name\"" bench/results/beauty_quality.json && [ -z "$RERUN" ]; then
    echo "== $name: already a row of bench/results/beauty_quality.json, skipped (RERUN=1 trains it)"
    continue
  fi
  echo "== $name $(date)"
  .venv/bin/fearec-dist train --config jobs/configs/beauty.yaml --local --set model.name=$1 \
    --set train.epochs=${EPOCHS:-10} --set train.seed=$2 $extra --name $name
  echo "== $name rc=$? $(date)"
done
