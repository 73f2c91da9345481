#!/bin/bash
# The GPU bench without Ray (bench/gpu.py; how to run it on a GPU machine: docs/benchmarks.md).
# Rows go to $OUT (the device tool's folder that comes back) or bench/results/gpu; DATA= a prepared
# dataset or Beauty.txt (default: data-cache/beauty/Beauty.txt, else ../shared/data/beauty/);
# PYTHON= the interpreter (default: .venv/bin/python here, python3 on a machine without the venv).
cd "$(dirname "$0")/.." && exec "${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}" bench/gpu.py --out "${OUT:-bench/results/gpu}" ${DATA:+--data "$DATA"} "$@"
