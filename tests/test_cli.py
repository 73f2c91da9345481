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
