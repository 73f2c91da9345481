"""Config loading: precedence, type checks, errors that name the key and the file."""

from __future__ import annotations

import pytest
import yaml

from fearec_dist.config import ConfigError, ExperimentConfig, config_from_saved, load_config


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


def test_storage_section_serves_everything_and_data_storage_is_its_alias(tmp_path):
    top = load_config(None, ["storage.endpoint_url=http://127.0.0.1:9000"])
    assert top.storage.endpoint_url == "http://127.0.0.1:9000"
    assert top.data.storage is top.storage  # one object: the alias can never disagree
    path = tmp_path / "alias.yaml"
    path.write_text("data:\n  storage:\n    endpoint_url: http://minio:9000\n    region: eu-1\n")
    alias = load_config(path)
    assert alias.storage.endpoint_url == "http://minio:9000" and alias.storage.region == "eu-1"
    assert "storage" not in alias.to_dict()["data"]  # written once, under its own home
    assert ExperimentConfig.from_dict(alias.to_dict()) == alias
    # a --set on the alias overrides the file's value (under either name), never conflicts
    moved = load_config(path, ["data.storage.endpoint_url=http://other:9000"])
    assert moved.storage.endpoint_url == "http://other:9000"
    assert load_config(path, ["storage.region=us-2"]).storage.region == "us-2"
    same = {"storage": {"region": "eu-1"}, "data": {"storage": {"region": "eu-1"}}}
    assert ExperimentConfig.from_dict(same).storage.region == "eu-1"


def test_storage_and_its_alias_differing_is_an_error(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "storage": {"endpoint_url": "http://a:9000"},
                "data": {"storage": {"endpoint_url": "http://b:9000"}},
            }
        )
    )
    with pytest.raises(ConfigError, match=r"both\.yaml.*storage\.endpoint_url.*data\.storage"):
        load_config(path)


def test_retired_n_buckets_is_refused_in_yaml_and_set_naming_the_key(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("data:\n  max_seq_len: 20\n  n_buckets: 64\n")
    with pytest.raises(ConfigError, match=r"old\.yaml: data\.n_buckets was removed with the stre"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set: data\.n_buckets was removed with the streaming"):
        load_config(None, ["data.n_buckets=8"])
    assert "n_buckets" not in load_config(None).to_dict()["data"]


def test_config_from_saved_drops_only_retired_keys():
    saved = load_config(None, ["train.lr=5e-4"]).to_dict()
    saved["data"]["n_buckets"] = 64  # what to_dict() wrote before the key was retired
    cfg = config_from_saved(saved, "state.pt")
    assert cfg == load_config(None, ["train.lr=5e-4"])
    assert saved["data"]["n_buckets"] == 64  # the saved dict is left as it was
    saved["data"]["n_bucket"] = 1  # anything else unknown is still an error naming it
    with pytest.raises(ConfigError, match=r"state\.pt: unknown key data\.n_bucket\b"):
        config_from_saved(saved, "state.pt")


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.amp=fp8", "train.amp"),
        ("train.negative_alpha=-0.5", "train.negative_alpha"),  # NaN loss
        ("train.negative_alpha=nan", "train.negative_alpha"),
        ("train.lr=nan", "train.lr"),
        ("train.softmax_temperature=nan", "train.softmax_temperature"),
        ("train.weight_decay=-0.1", "train.weight_decay"),
        ("train.topk=[0, 10]", "train.topk"),
        ("train.torch_threads=-1", "train.torch_threads"),
        ("train.max_steps_per_epoch=-1", "train.max_steps_per_epoch"),
        ("tune.reduction_factor=1", "tune.reduction_factor"),  # ASHA fails only once Ray runs
        ("tune.num_samples=0", "tune.num_samples"),
        ("tune.driver_cpus=0", "tune.driver_cpus"),
        ("run.checkpoints_to_keep=0", "run.checkpoints_to_keep"),
        ("run.max_failures=-2", "run.max_failures"),
    ],
)
def test_settings_that_yield_nan_or_nonsense_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_sparse_item_updates_with_weight_decay_is_refused_naming_both_keys():
    sampled = ["train.softmax=sampled", "train.sparse_item_updates=true"]
    with pytest.raises(ConfigError, match=r"sparse_item_updates.*weight_decay") as err:
        load_config(None, [*sampled, "train.weight_decay=0.01"])
    assert "silently" in str(err.value)
    assert load_config(None, sampled).train.weight_decay == 0.0  # without decay: fine
    assert load_config(None, ["train.weight_decay=0.01"]).train.weight_decay == 0.01  # dense: fine
