"""RecBole checkpoint import (spec recbole-state-dicts.md): checkpoints are built here from the
listing (a dict with a pickled stand-in ``Config`` holding ``final_config_dict``, saved with
``torch.save(..., pickle_protocol=4)``), including files that carry foreign classes which must
not run."""

from __future__ import annotations

import builtins
import os
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from fearec_dist.models import RecBoleImportError, build_model, load_recbole

FEAREC_CONFIG = {  # the official Beauty run as RecBole's final_config_dict spells it
    "model": "FEARec",
    "MAX_ITEM_LIST_LENGTH": 50,
    "hidden_size": 64,
    "n_layers": 2,
    "n_heads": 2,
    "inner_size": 256,
    "hidden_dropout_prob": 0.5,
    "attn_dropout_prob": 0.5,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "initializer_range": 0.02,
    "loss_type": "CE",
    "global_ratio": 0.6,
    "topk_factor": 1,
    "dual_domain": True,
    "std": True,
    "spatial_ratio": 0.1,
    "contrast": "us_x",
    "sim": "dot",
    "tau": 1,
    "lmd": 0.1,
    "lmd_sem": 0.1,
    "fredom": False,
    "fredom_type": "None",
    "device": torch.device("cpu"),
}
SASREC_CONFIG = {
    k: FEAREC_CONFIG[k]
    for k in (
        "MAX_ITEM_LIST_LENGTH",
        "hidden_size",
        "n_layers",
        "n_heads",
        "inner_size",
        "hidden_dropout_prob",
        "attn_dropout_prob",
        "hidden_act",
        "layer_norm_eps",
        "initializer_range",
        "loss_type",
    )
} | {"model": "SASRec"}


class FakeRecBole:
    """Stand-ins for ``recbole.config.configurator.Config`` and an enum-like RecBole value,
    importable under RecBole's module names only while a checkpoint is written."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        modules = {}
        for name in ("recbole", "recbole.config", "recbole.config.configurator", "recbole.utils"):
            modules[name] = types.ModuleType(name)
            monkeypatch.setitem(sys.modules, name, modules[name])

        def config_init(self, final: dict) -> None:
            self.final_config_dict = final
            self.model = final["model"]

        def enum_init(self, value: int) -> None:
            self.value = value

        module = "recbole.config.configurator"
        self.Config = type("Config", (), {"__init__": config_init, "__module__": module})
        self.ModelType = type(
            "ModelType", (), {"__init__": enum_init, "__module__": "recbole.utils"}
        )
        self.ModelType.__reduce__ = lambda obj: (type(obj), (obj.value,))
        modules[module].Config = self.Config
        modules["recbole.utils"].ModelType = self.ModelType

    def write(self, path: Path, state: dict, final: dict, extra: object = None) -> None:
        checkpoint = {
            "config": self.Config(dict(final) | {"MODEL_TYPE": self.ModelType(1)}),
            "epoch": 3,
            "cur_step": 0,
            "best_valid_score": 0.05,
            "state_dict": state,
            "other_parameter": None,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
        }
        if extra is not None:
            checkpoint["extra"] = extra
        torch.save(checkpoint, path, pickle_protocol=4)
        self.monkeypatch.undo()  # loading happens without the stand-ins importable


@pytest.fixture
def fake_recbole(monkeypatch: pytest.MonkeyPatch) -> FakeRecBole:
    return FakeRecBole(monkeypatch)


def recbole_state(name: str, **overrides) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = build_model(name, n_items=1682, max_seq_len=50, **overrides).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if name.startswith("fearec"):  # RecBole's alias of the last block (spec §10.12)
        last = "item_encoder.layer.1."
        for k in list(state):
            if k.startswith(last):
                state["item_encoder.layer_ramp." + k[len(last) :]] = state[k].clone()
    return model, state


def test_fearec_checkpoint_matches_the_listing_and_loads(
    tmp_path: Path, fake_recbole: FakeRecBole
) -> None:
    model, state = recbole_state("fearec_official")
    assert state["item_embedding.weight"].shape == (1683, 64)
    assert len(state) == 52  # the listing: 34 block keys, 16 layer_ramp aliases, 2 LN
    path = tmp_path / "FEARec.pth"
    fake_recbole.write(path, state, FEAREC_CONFIG)
    with pytest.raises(Exception, match="Weights only load failed"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about protocol 4 before failing
        torch.load(path)  # what a plain load does with the pickled Config
    loaded = load_recbole(path)
    assert not loaded.training
    c = loaded.config
    assert (c.global_ratio, c.topk_factor, c.spatial_ratio, c.contrast) == (0.6, 1.0, 0.1, "us_x")
    assert c.dual_domain and c.band_limit_time and not c.freq_reg
    seq = torch.randint(1, 1683, (4, 50))
    lens = torch.tensor([50, 1, 7, 33])
    with torch.no_grad():
        torch.testing.assert_close(loaded(seq, lens), model(seq, lens))


def test_sasrec_checkpoint_loads(tmp_path: Path, fake_recbole: FakeRecBole) -> None:
    model, state = recbole_state("sasrec")
    assert len(state) == 36
    path = tmp_path / "SASRec.pth"
    fake_recbole.write(path, state, SASREC_CONFIG)
    loaded = load_recbole(path)
    seq, lens = torch.randint(1, 1683, (3, 50)), torch.tensor([50, 2, 9])
    with torch.no_grad():
        torch.testing.assert_close(loaded(seq, lens), model(seq, lens))


def test_recbole_default_config_means_no_contrast(
    tmp_path: Path, fake_recbole: FakeRecBole
) -> None:
    _, state = recbole_state("fearec")
    final = {k: v for k, v in FEAREC_CONFIG.items() if k not in ("contrast", "sim", "tau")}
    final |= {"global_ratio": 1, "dual_domain": False, "std": False, "spatial_ratio": 0}
    path = tmp_path / "FEARec.pth"
    fake_recbole.write(path, state, final)
    assert load_recbole(path).config.contrast == "none"  # RecBole 1.2.1 defaults (§10.1)


def test_unknown_and_missing_keys_are_listed(tmp_path: Path, fake_recbole: FakeRecBole) -> None:
    _, state = recbole_state("sasrec")
    state["trm_encoder.layer.0.extra.weight"] = torch.zeros(3)
    del state["LayerNorm.bias"]
    path = tmp_path / "SASRec.pth"
    fake_recbole.write(path, state, SASREC_CONFIG)
    with pytest.raises(RecBoleImportError) as err:
        load_recbole(path)
    assert "trm_encoder.layer.0.extra.weight" in str(err.value)
    assert "LayerNorm.bias" in str(err.value)


def test_bare_state_dict_and_item_reordering() -> None:
    model, state = recbole_state("sasrec")
    tokens = ["[PAD]"] + [f"i{n}" for n in range(1, 1683)]  # RecBole's id -> token
    vocab = ["<pad>"] + [f"i{n}" for n in range(1682, 0, -1)]  # ours: the reverse order
    loaded = load_recbole(
        {k: v for k, v in state.items()},
        model="SASRec",
        config=SASREC_CONFIG,
        item_tokens=tokens,
        vocab=vocab,
    )
    ours = loaded.item_embedding.weight
    theirs = state["item_embedding.weight"]
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1682])  # our id 1 is token i1682
    with pytest.raises(RecBoleImportError, match="not in the RecBole vocabulary"):
        load_recbole(state, model="SASRec", item_tokens=tokens, vocab=["<pad>", "zzz"])
    with pytest.raises(RecBoleImportError, match="importable models"):
        load_recbole(state)  # no Config and no model name


class Payload:
    """A foreign object whose unpickling would run code: exec via __reduce__."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


class OsPayload(Payload):
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_foreign_class_is_stubbed_not_run(tmp_path: Path, fake_recbole: FakeRecBole) -> None:
    model, state = recbole_state("sasrec")
    marker = tmp_path / "ran.txt"
    path = tmp_path / "SASRec.pth"
    fake_recbole.write(path, state, SASREC_CONFIG, extra=Payload(marker))
    loaded = load_recbole(path)  # the exec call became an inert stub
    assert not marker.exists()
    seq, lens = torch.randint(1, 1683, (2, 50)), torch.tensor([5, 50])
    with torch.no_grad():
        torch.testing.assert_close(loaded(seq, lens), model(seq, lens))


def test_os_system_payload_is_stubbed_not_run(tmp_path: Path, fake_recbole: FakeRecBole) -> None:
    _, state = recbole_state("sasrec")
    marker = tmp_path / "ran.txt"
    path = tmp_path / "SASRec.pth"
    fake_recbole.write(path, state, SASREC_CONFIG, extra=OsPayload(marker))
    load_recbole(path)
    assert not marker.exists()


def test_not_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a zip")
    with pytest.raises(RecBoleImportError, match="cannot read"):
        load_recbole(path)
