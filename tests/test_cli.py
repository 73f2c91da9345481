"""The command line: help for every command, config errors before anything starts, exit codes."""

from __future__ import annotations

import time

import pytest

from fearec_dist.cli import build_parser, main


@pytest.mark.parametrize("command", ["prepare", "train", "tune", "evaluate", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: fearec-dist" in capsys.readouterr().out


def test_top_level_help_lists_commands():
    text = build_parser().format_help()
    for command in ("prepare", "train", "tune", "evaluate", "demo"):
        assert command in text


def test_bad_config_key_fails_fast_naming_it(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochs: 1\nmodel:\n  name: fearec_official\n  hiden_size: 8\n")
    start = time.time()
    assert main(["train", "--config", str(cfg), "--local"]) == 2
    assert time.time() - start < 10
    assert "model.hiden_size" in capsys.readouterr().err


def test_bad_override_and_bad_model_value(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: fearec_official\n")
    assert main(["train", "--config", str(cfg), "--set", "train.epochs=zero"]) == 2
    assert "train.epochs" in capsys.readouterr().err
    # k = int(10 * ln 4) = 13 > L = 4 delays: rejected when the config is loaded (spec §10.6)
    args = ["--set", "model.topk_factor=10", "--set", "data.max_seq_len=4"]
    assert main(["train", "--config", str(cfg), *args]) == 2
    assert "model.topk_factor" in capsys.readouterr().err


def test_prepare_bad_input_exits_nonzero_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "log.csv"
    bad.write_text("user_id,item_id\nu,i\n")
    code = main(
        ["prepare", "--input", str(bad), "--format", "csv", "--output", str(tmp_path / "o")]
    )
    assert code == 1
    assert "log.csv" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--baseline", "random", "--data", "d"], 2, "invalid choice: 'random'"),
        (["--baseline", "popularity", "--checkpoint", "c"], 2, "not allowed with"),
        ([], 2, "one of the arguments --checkpoint --baseline is required"),
        (["--baseline", "popularity"], 1, "--baseline popularity needs --data"),
        (["--checkpoint", "c", "--data", "d"], 1, "--data is for --baseline"),
        (["--checkpoint", "c", "--max-seq-len", "20"], 1, "--max-seq-len is for --baseline"),
        (["--baseline", "popularity", "--data", "d", "--users", "-1"], 1, "--users"),
    ],
)
def test_evaluate_argument_errors(args, code, message, capsys):
    if code == 2:  # argparse's own errors
        with pytest.raises(SystemExit) as exit_info:
            main(["evaluate", *args])
        assert exit_info.value.code == 2
    else:
        assert main(["evaluate", *args]) == code
    assert message in capsys.readouterr().err


def test_evaluate_baseline_popularity_prints_the_table_and_json(tmp_path, capsys):
    """No Ray: the rows and the counts are read with pyarrow in this process."""
    import json

    from tests.train.test_eval_chunks import HAND, write_prepared

    uri = write_prepared(tmp_path / "prep", HAND, n_items=6)
    assert main(["evaluate", "--baseline", "popularity", "--data", uri, "--users", "3"]) == 0
    out = capsys.readouterr().out
    assert "hr@10" in out and "test" in out and "baseline popularity" in out
    assert "users: a seeded sample of 3 of 4 (seed 2026)" in out
    assert main(["evaluate", "--baseline", "popularity", "--data", uri, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["baseline"] == "popularity" and results["test"]["hr@5"] == 1.0
    assert results["users"] == {"scored": 4, "of": 4, "seed": None}
    assert (results["n_valid"], results["n_test"]) == (2, 3)


def test_results_summary_of_a_run_trained_without_evaluation(capsys):
    from fearec_dist.cli import _print_results

    _print_results({"valid": {}, "test": {}, "best_epoch": 0, "epochs_run": 2})
    out = capsys.readouterr().out
    assert "2 epoch(s) run, none evaluated (train.evaluate=false)" in out
    assert "nan" not in out and "best epoch 0" not in out
    # its checkpoint scored afterwards (evaluate --checkpoint): metrics at the last epoch
    _print_results({"valid": {"hr@10": 0.5}, "test": {"hr@10": 0.4}, "best_epoch": 0,
                    "epochs_run": 2})  # fmt: skip
    out = capsys.readouterr().out
    assert "0.4000" in out and "2 epoch(s) run, scored at the last" in out
    _print_results({"valid": {"hr@10": 0.5}, "test": {"hr@10": 0.4}, "best_epoch": 3,
                    "epochs_run": 5})  # fmt: skip
    assert "best epoch 3 of 5 run" in capsys.readouterr().out
