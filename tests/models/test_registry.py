"""The model registry: names, presets, key checks, and FEARec's crash cases (spec §10.4-10.6)."""

from __future__ import annotations

import pytest
import torch

from fearec_dist.config import ConfigError
from fearec_dist.models import (
    build_config,
    build_model,
    get_spec,
    model_names,
    validate_model_section,
)
from fearec_dist.models.fearec import FEARec, FEARecConfig
from fearec_dist.models.sasrec import SASRec


def test_presets_resolve_to_their_model() -> None:
    official = build_model("fearec_official", n_items=10, max_seq_len=50)
    assert isinstance(official, FEARec)
    c = official.config
    assert (c.contrast, c.sim, c.tau, c.lmd_sem) == ("us_x", "dot", 1.0, 0.1)
    assert (c.global_ratio, c.topk_factor, c.spatial_ratio) == (0.6, 1.0, 0.1)
    assert c.dual_domain and c.band_limit_time and not c.freq_reg
    assert (c.hidden_dropout, c.attn_dropout, c.n_layers, c.n_heads) == (0.5, 0.5, 2, 2)
    assert (c.hidden_size, c.inner_size) == (64, 256)
    paper = build_model("fearec_paper", n_items=10, max_seq_len=50).config
    assert paper.freq_reg and paper.freq_reg_pairs == "us_x"
    assert isinstance(build_model("sasrec", n_items=10, max_seq_len=50), SASRec)
    spec = get_spec("fearec_official")
    assert spec.model_cls is FEARec and spec.config_cls is FEARecConfig
    assert spec.needs_partner(official.config) and spec.name == "fearec_official"
    sasrec = get_spec("sasrec")
    assert not sasrec.needs_partner(build_config("sasrec", {})) and not sasrec.needs_attributes


def test_item_table_has_padding_row() -> None:
    for name in ("fearec", "sasrec"):
        model = build_model(name, n_items=17, max_seq_len=20)
        assert model.item_embedding.weight.shape == (18, 64)
        assert model.item_embedding.weight[0].abs().sum() > 0  # RecBole's init overwrites row 0


def test_overrides_beat_presets() -> None:
    model = build_model("fearec_official", n_items=10, max_seq_len=50, contrast="none", tau=0.5)
    assert model.config.contrast == "none" and model.config.tau == 0.5
    assert not model.needs_partner


def test_unknown_key_names_it() -> None:
    with pytest.raises(ConfigError, match=r"model\.hiden_size"):
        build_model("fearec", n_items=10, max_seq_len=50, hiden_size=32)
    with pytest.raises(ConfigError, match=r"model\.lmd_semm"):
        validate_model_section("fearec_official", {"lmd_semm": 0.1}, 50)


def test_unknown_model_lists_names() -> None:
    with pytest.raises(ConfigError, match="fearec_official") as err:
        get_spec("fearek")
    assert "sasrec" in str(err.value)
    assert {"fearec", "fearec_official", "fearec_paper", "sasrec"} <= set(model_names())


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"hidden_size": "64"}, "model.hidden_size"),  # wrong type
        ({"n_heads": 3}, "model.n_heads"),  # 64 % 3
        ({"hidden_dropout": 1.0}, "model.hidden_dropout"),
        ({"global_ratio": 0.0}, "model.global_ratio"),
        ({"spatial_ratio": 1.5}, "model.spatial_ratio"),
        ({"contrast": "cl4srec"}, "model.contrast"),
        ({"sim": "l2"}, "model.sim"),
        ({"tau": 0.0}, "model.tau"),
        ({"freq_reg_pairs": "none"}, "model.freq_reg_pairs"),
        ({"n_layers": 0}, "model.n_layers"),
    ],
)
def test_bad_values_name_the_key(params: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_model_section("fearec", params, 50)


@pytest.mark.parametrize(("factor", "L"), [(1.0, 2), (5.0, 10), (0.1, 50)])
def test_k_outside_1_to_L_is_rejected(factor: float, L: int) -> None:
    # §10.6: k = 0 makes Branch A output zeros; k > L crashes topk in the reference
    with pytest.raises(ConfigError, match=r"model\.topk_factor"):
        validate_model_section("fearec", {"topk_factor": factor}, L)
    with pytest.raises(ConfigError, match=r"model\.topk_factor"):
        build_model("fearec", n_items=5, max_seq_len=L, topk_factor=factor)


def test_empty_band_is_rejected() -> None:
    # L = 4: F = 3 bins; 4 layers in mode L leave a layer without a bin
    with pytest.raises(ConfigError, match=r"model\.global_ratio"):
        validate_model_section("fearec", {"n_layers": 4, "global_ratio": 0.2}, 4)


def test_one_layer_model_works() -> None:
    # §10.4: the reference divides by n_layers - 1; here slide = 0 and the band is every bin
    model = build_model("fearec_official", n_items=20, max_seq_len=10, n_layers=1)
    attention = model.item_encoder.layer[0].hybrid_attention
    assert attention.full_band
    torch.testing.assert_close(attention.band_proj, torch.eye(10), atol=1e-6, rtol=0)
    seq = torch.randint(1, 21, (3, 10))
    model(seq, torch.tensor([10, 4, 1])).sum().backward()


@pytest.mark.parametrize("L", [7, 49])
def test_odd_length_dual_domain_works(L: int) -> None:
    # §10.5: the reference's irfft returns L - 1 samples for odd L; we pass n = L
    model = build_model("fearec_official", n_items=20, max_seq_len=L, topk_factor=1.0)
    seq = torch.randint(1, 21, (3, L))
    out = model(seq, torch.tensor([L, 2, 1]))
    assert out.shape == (3, 64)
    out.sum().backward()
    validate_model_section("fearec_official", {}, L)


def test_sasrec_rejects_unknown_and_bad_keys() -> None:
    with pytest.raises(ConfigError, match=r"model\.global_ratio"):
        validate_model_section("sasrec", {"global_ratio": 0.6}, 50)
    with pytest.raises(ConfigError, match=r"model\.n_heads"):
        validate_model_section("sasrec", {"n_heads": 5}, 50)
