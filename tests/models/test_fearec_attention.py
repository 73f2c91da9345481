"""FEARec's hybrid attention against a slow reference written from spec fearec.md §3, and the
properties of §11 (MHA equivalence, mask independence, batch of one, delay direction)."""

from __future__ import annotations

import math

import pytest
import torch

from fearec_dist.models import build_model
from fearec_dist.models.fea_attention import (
    HybridAttention,
    aggregate_delays,
    circulant_index,
    layer_band,
    topk_count,
)
from fearec_dist.models.layers import MultiHeadAttention, causal_padding_mask, init_weights

B, L, D, H = 4, 12, 8, 2


def make_attention(
    layer: int = 0,
    n_layers: int = 2,
    g: float = 0.6,
    factor: float = 1.0,
    dual: bool = False,
    std: bool = False,
    gamma: float = 0.0,
    length: int = L,
    per_sample: bool = False,
) -> HybridAttention:
    torch.manual_seed(0)
    att = HybridAttention(
        D,
        H,
        0.0,
        0.0,
        1e-12,
        length,
        layer_band(length, n_layers, g, layer),
        topk_count(factor, length),
        dual,
        std,
        gamma,
        per_sample,
    )
    att.apply(lambda m: init_weights(m, 0.3))
    return att


def reference(
    att: HybridAttention,
    x: torch.Tensor,
    mask: torch.Tensor,
    band: range,
    k: int,
    dual: bool,
    std: bool,
    gamma: float,
    training: bool,
) -> torch.Tensor:
    """Spec §3.1-3.4 step by step, heads split, loops over delays and rows (dropout off)."""
    Bn, Ln, Dn = x.shape
    e, F = Dn // H, Ln // 2 + 1

    def heads_time_last(t: torch.Tensor) -> torch.Tensor:
        return t.view(Bn, Ln, H, e).permute(0, 2, 3, 1)  # (B, H, E, L)

    q = heads_time_last(att.query_layer(x))
    k_ = heads_time_last(att.key_layer(x))
    v = heads_time_last(att.value_layer(x))
    qf, kf = torch.fft.rfft(q, dim=-1), torch.fft.rfft(k_, dim=-1)
    box = torch.zeros_like(qf)
    idx = list(band)
    box[..., idx] = qf[..., idx] * torch.conj(kf[..., idx])
    corr = torch.fft.irfft(box, n=Ln, dim=-1)  # (B, H, E, L)
    c = corr.mean(dim=1).mean(dim=1)  # (B, L): heads first, then channels
    agg = torch.zeros_like(v)
    if training:
        delays = torch.topk(c.mean(dim=0), k).indices
        w = torch.softmax(torch.stack([c[:, int(d)] for d in delays], dim=-1), dim=-1)
        for i, d in enumerate(delays):
            agg = agg + torch.roll(v, -int(d), dims=-1) * w[:, i, None, None, None]
    else:
        for b in range(Bn):
            vals, delays = torch.topk(c[b], k)
            w = torch.softmax(vals, dim=-1)
            for i, d in enumerate(delays):
                agg[b] = agg[b] + torch.roll(v[b], -int(d), dims=-1) * w[i]
    ctx = agg.permute(0, 3, 1, 2).reshape(Bn, Ln, Dn)
    if dual:
        keep = idx if std else list(range(F))

        def filt(t: torch.Tensor) -> torch.Tensor:
            spec = torch.fft.rfft(t, dim=-1)
            out = torch.zeros_like(spec)
            out[..., keep] = spec[..., keep]
            return torch.fft.irfft(out, n=Ln, dim=-1).permute(0, 1, 3, 2)  # (B, H, L, E)

        qt, kt, vt = filt(q), filt(k_), filt(v)
        p = torch.softmax(qt @ kt.transpose(-1, -2) / math.sqrt(e) + mask, dim=-1)
        ctx_time = (p @ vt).permute(0, 2, 1, 3).reshape(Bn, Ln, Dn)
        ctx = (1 - gamma) * ctx + gamma * ctx_time
    return att.LayerNorm(x + att.dense(ctx))


def toy_inputs(length: int = L) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(B, length, D)
    lens = torch.tensor([length, 1, 5, length - 2])
    seq = (torch.arange(length)[None, :] < lens[:, None]).long() * 3
    return x, causal_padding_mask(seq)


CASES = [  # (layer, n_layers, g, factor, dual, std, gamma) as in spec §11's checks
    (0, 2, 0.6, 1, True, True, 0.1),
    (1, 2, 1.0, 1, False, False, 0.0),
    (1, 3, 0.3, 3, True, False, 0.5),
    (3, 4, 0.6, 2, True, True, 0.9),
    (0, 2, 0.8, 4, True, True, 0.1),
]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("layer", "n", "g", "factor", "dual", "std", "gamma"), CASES)
def test_matches_loop_reference(layer, n, g, factor, dual, std, gamma, training) -> None:
    att = make_attention(layer, n, g, factor, dual, std, gamma)
    att.train(training)
    x, mask = toy_inputs()
    band = layer_band(L, n, g, layer)
    with torch.no_grad():
        got = att(x, mask)
        want = reference(att, x, mask, band, topk_count(factor, L), dual, std, gamma, training)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_odd_length_matches_reference() -> None:
    # §10.5: the reference breaks on odd L with dual domain; we pass n=L to irfft
    att = make_attention(0, 2, 0.6, 1, True, True, 0.1, length=11).eval()
    x, mask = toy_inputs(11)
    with torch.no_grad():
        got = att(x, mask)
        want = reference(att, x, mask, layer_band(11, 2, 0.6, 0), 2, True, True, 0.1, False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_per_sample_delays_in_training_equals_eval_path() -> None:
    att = make_attention(0, 2, 0.6, 2, False, False, 0.0, per_sample=True).train()
    x, mask = toy_inputs()
    with torch.no_grad():
        got = att(x, mask)
        want = att.eval()(x, mask)
    torch.testing.assert_close(got, want)


def test_equals_mha_at_full_band_and_gamma_one() -> None:
    # §11: g = 1, std False, dual True, γ = 1 -> standard causal multi-head attention
    att = make_attention(0, 2, 1.0, 1, True, False, 1.0).eval()
    mha = MultiHeadAttention(D, H, 0.0, 0.0, 1e-12).eval()
    mha.query.load_state_dict(att.query_layer.state_dict())
    mha.key.load_state_dict(att.key_layer.state_dict())
    mha.value.load_state_dict(att.value_layer.state_dict())
    mha.dense.load_state_dict(att.dense.state_dict())
    mha.LayerNorm.load_state_dict(att.LayerNorm.state_dict())
    x, mask = toy_inputs()
    with torch.no_grad():
        torch.testing.assert_close(att(x, mask), mha(x, mask), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("dual", "gamma"), [(True, 0.0), (False, 0.7)])
def test_no_mask_dependence_without_time_branch(dual: bool, gamma: float) -> None:
    att = make_attention(0, 2, 0.6, 1, dual, True, gamma)
    x, mask = toy_inputs()
    other = torch.randn(B, 1, L, L) * 1000
    for training in (True, False):
        att.train(training)
        with torch.no_grad():
            torch.testing.assert_close(att(x, mask), att(x, other))


def test_time_branch_uses_the_mask() -> None:
    att = make_attention(0, 2, 0.6, 1, True, True, 0.5).eval()
    x, mask = toy_inputs()
    with torch.no_grad():
        assert not torch.allclose(att(x, mask), att(x, torch.zeros_like(mask)))


def test_single_delay_direction() -> None:
    # §11: one delay τ with weight 1 -> output t reads input (t + τ) mod L
    values = torch.randn(2, L, D)
    for tau in (0, 1, 5, L - 1):
        delay = torch.tensor([[tau], [tau]])
        out = aggregate_delays(values, delay, torch.ones(2, 1), circulant_index(L))
        want = values[:, (torch.arange(L) + tau) % L]
        torch.testing.assert_close(out, want)


def test_batch_of_one_train_equals_eval() -> None:
    # §11: dropout off, one sample: shared delays = per-sample delays
    model = build_model(
        "fearec_official", n_items=30, max_seq_len=L, hidden_dropout=0.0, attn_dropout=0.0
    )
    seq = torch.tensor([[5, 3, 9, 2, 7, 0, 0, 0, 0, 0, 0, 0]])
    lens = torch.tensor([5])
    with torch.no_grad():
        train_out = model.train()(seq, lens)
        eval_out = model.eval()(seq, lens)
    torch.testing.assert_close(train_out, eval_out)


def test_gradients_reach_queries_and_keys_through_delay_weights() -> None:
    att = make_attention(0, 2, 0.6, 1, False, False, 0.0).train()
    x, mask = toy_inputs()
    att(x, mask).sum().backward()
    for lin in (att.query_layer, att.key_layer, att.value_layer):
        assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_autocast_bf16_runs_in_float32_ffts() -> None:
    model = build_model("fearec_official", n_items=30, max_seq_len=L).train()
    seq = torch.randint(1, 31, (3, L))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(seq, torch.tensor([L, 3, 7]))
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all()
