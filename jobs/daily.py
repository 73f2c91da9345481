"""The daily job as a Ray job entrypoint (``ray job submit``, or the RayJob that
``cluster/kuberay/daily-cronjob.yaml`` creates every day):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/daily.py --config jobs/configs/daily-s3.yaml \\
        --input s3://YOUR-BUCKET/fearec/logs/interactions [--format parquet] [--set k=v ...]

The same as ``python -m fearec_dist daily …``: inside a Ray job it joins the cluster
(``RAY_ADDRESS``). ``--input`` is the log's root, the same every day: the append reads only the
partitions (or Delta commits) the dataset has not consumed. Exit status: 0 when the day promoted,
rejected or had nothing to do; 1 when it failed (the pointer unchanged, docs/daily.md says how
to recover); 2 for a config error.
"""

from __future__ import annotations

import sys
from pathlib import Path

# the checkout this file ships in (``--working-dir``) before an installed copy of the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fearec_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["daily", *sys.argv[1:]]))
