#!/bin/bash
# Quality on Amazon Beauty: SASRec and FEARec (fearec_official) through the Ray path with the
# same fixed budget (train.epochs, default 10), run one after the other. The run names are fixed,
# so running this again (e.g. EPOCHS=20 bench/beauty_quality.sh) resumes both runs.
#   bash bench/beauty_quality.sh > runs/beauty.log 2>&1 &
cd "$(dirname "$0")/.." && mkdir -p runs
for spec in "sasrec sasrec-beauty-10ep" "fearec_official fearec-beauty-10ep"; do
  set -- $spec
  echo "== $2 $(date)"
  .venv/bin/fearec-dist train --config jobs/configs/beauty.yaml --local \
    --set model.name=$1 --set train.epochs=${EPOCHS:-10} --name $2 &
  child=$!
  echo $child > runs/beauty-quality.pid
  wait $child
  echo "== $2 rc=$? $(date)"
done
