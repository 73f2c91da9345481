#!/bin/bash
# ml-100k under leave-one-out and under the temporal protocol (issue 26): SASRec and FEARec
# (fearec_official) with the same budget (train.epochs, default 10) under each protocol, one run
# after the other, plus the popularity baseline under each; every results.json and the baselines'
# JSON are gathered into bench/results/ml100k_protocols.json. The temporal cuts are the last 10 %
# of ml-100k's time span (214.84 days, 1997-09-20 to 1998-04-22): 10.742 days of validation, then
# 10.742 days of test. The run names are fixed: running it again resumes (EPOCHS=20 trains on).
#   bash bench/ml100k_protocols.sh > runs/ml100k-protocols.log 2>&1 &
set -u
cd "$(dirname "$0")/.." && mkdir -p runs/ml100k-protocols
PREP=prepared/ml-100k
FD=.venv/bin/fearec-dist
CONFIG=bench/configs/ml100k-protocols.yaml
OUT=runs/ml100k-protocols
TEMPORAL=(--set data.split=temporal --set data.valid_days=10.742 --set data.test_days=10.742)
[ -e $PREP ] || $FD prepare --input ../shared/data/ml-100k/ml-100k.inter --format atomic --output $PREP
for protocol in loo temporal; do
  cuts=(); [ $protocol = temporal ] && cuts=("${TEMPORAL[@]}")
  $FD evaluate --baseline popularity --data $PREP --json "${cuts[@]}" > $OUT/popularity-$protocol.json
  for model in sasrec fearec_official; do
    echo "== $model $protocol $(date) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $FD train --config $CONFIG --local --set model.name=$model --set train.epochs=${EPOCHS:-10} \
      --name $model-$protocol "${cuts[@]}"
    echo "== $model $protocol rc=$? $(date) load $(cut -d' ' -f1-3 /proc/loadavg)"
  done
done
.venv/bin/python - <<'PY'
import json, pathlib
out = pathlib.Path("runs/ml100k-protocols")
rows = {}
for protocol in ("loo", "temporal"):
    rows[f"popularity-{protocol}"] = json.loads((out / f"popularity-{protocol}.json").read_text())
    for model in ("sasrec", "fearec_official"):
        path = out / f"{model}-{protocol}" / "results.json"
        if path.exists():
            r = json.loads(path.read_text())
            rows[f"{model}-{protocol}"] = {k: r[k] for k in ("valid", "test", "best_epoch",
                                           "epochs_run", "seconds_training", "protocol", "data")}
pathlib.Path("bench/results/ml100k_protocols.json").write_text(json.dumps(rows, indent=2) + "\n")
print(json.dumps({k: v["test"].get("ndcg@10") for k, v in rows.items()}, indent=1))
PY
