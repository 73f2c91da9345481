"""Configs saved inside checkpoints before a key was retired still load: ``evaluate --checkpoint``
and ``export`` rebuild the run's config with ``config_from_saved`` (``RETIRED_KEYS``), while YAML
and ``--set`` refuse the key (tests/test_config.py)."""

from __future__ import annotations

import json
import shutil

from fearec_dist.cli import main
from fearec_dist.train.checkpoint import load_state, save_state


def test_a_checkpoint_saved_with_n_buckets_still_evaluates_and_exports(make_run, tmp_path, capsys):
    """The serving tests' small run (trained once per session), copied; its saved config gets
    data.n_buckets = 64 as ``to_dict()`` wrote it before the key was retired."""
    run_dir = tmp_path / "old-run"
    ckpt = run_dir / "checkpoint_000001"
    shutil.copytree(make_run("sasrec").dir / "checkpoint_000001", ckpt)
    state = load_state(ckpt)
    state["config"]["data"]["n_buckets"] = 64
    save_state(ckpt, state)
    assert load_state(ckpt)["config"]["data"]["n_buckets"] == 64

    assert main(["evaluate", "--checkpoint", str(run_dir), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["checkpoint"].endswith("checkpoint_000001") and results["test"]["hr@10"] > 0
    out = tmp_path / "export"
    assert main(["export", "--run", str(run_dir), "--output", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["model"] == "sasrec"
