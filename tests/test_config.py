"""Config loading: precedence, type checks, errors that name the key and the file."""

from __future__ import annotations

import pytest
import yaml

from fearec_dist.config import ConfigError, ExperimentConfig, load_config


def test_precedence_defaults_file_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump({"train": {"lr": 0.01, "epochs": 3}, "model": {"name": "sasrec"}})
    )
    cfg = load_config(path, ["train.lr=1e-4", "model.hidden_dropout=0.2"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.epochs == 3
    assert cfg.train.batch_size == 256  # default
    assert cfg.model.name == "sasrec" and cfg.model.params == {"hidden_dropout": 0.2}


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.lrr"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown key run\.wrokers"):
        load_config(None, ["run.wrokers=2"])
    with pytest.raises(ConfigError, match=r"unknown key nosection"):
        load_config(None, ["nosection.x=1"])


def test_wrong_type_and_bad_values():
    with pytest.raises(ConfigError, match=r"train\.epochs = 'ten'.*expected int"):
        load_config(None, ["train.epochs=ten"])
    with pytest.raises(ConfigError, match=r"train\.valid_metric"):
        load_config(None, ["train.valid_metric=auc"])
    with pytest.raises(ConfigError, match=r"data\.format"):
        load_config(None, ["data.format=xml"])
    with pytest.raises(ConfigError, match=r"--set"):
        load_config(None, ["train.lr"])


def test_round_trip_through_dict():
    cfg = load_config(None, ["model.name=fearec_official", "model.topk_factor=3", "train.topk=[5]"])
    again = ExperimentConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.train.topk == [5, 10]  # the valid metric's K is always computed
