"""LightSANs (spec lightsans.md): the attention equals the spec's decomposition computed by hand,
batch-dependent tensors grow linearly in L, no masks, θ's init, the CE, and overfitting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fearec_dist.models import build_model, get_spec
from fearec_dist.models.lightsans import full_scores, loss_terms

N_ITEMS, L = 12, 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/models/conftest.py


def toy_model(max_seq_len: int = L, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(hidden_size=12, inner_size=20, k_interests=3) | kw
    return build_model("lightsans", n_items=N_ITEMS, max_seq_len=max_seq_len, **args)


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def test_attention_equals_the_spec_decomposition() -> None:
    model = toy_model().double().eval()
    mha = model.trm_encoder.layer[0].multi_head_attention
    with torch.no_grad():  # non-trivial biases and LN affine, so each one is checked
        for p in mha.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, L, 12, generator=g, dtype=torch.float64)
    pos = torch.randn(L, 12, generator=g, dtype=torch.float64)
    h, e = 2, 6
    with torch.no_grad():
        got = mha(x, pos)
        want = torch.empty_like(x)
        for b in range(2):
            q, k, v = linear(x[b], mha.query), linear(x[b], mha.key), linear(x[b], mha.value)
            d_k = torch.softmax(k @ mha.attpooling_key.theta, dim=0)  # (L, k) over L
            d_v = torch.softmax(v @ mha.attpooling_value.theta, dim=0)
            k_bar, v_bar = d_k.T @ k, d_v.T @ v  # (k, d)
            p_t = F.layer_norm(pos, (12,), mha.pos_ln.weight, mha.pos_ln.bias, 1e-12)
            pq = linear(p_t, mha.pos_q_linear) * (2 * e) ** -0.5
            pk = linear(p_t, mha.pos_k_linear)
            heads = []
            for i in range(h):
                cols = slice(i * e, (i + 1) * e)
                a = torch.softmax(q[:, cols] @ k_bar[:, cols].T / math.sqrt(e), dim=0)  # (L, k)
                gpos = torch.softmax(pq[:, cols] @ pk[:, cols].T / math.sqrt(e), dim=0)  # (L, L)
                heads.append(a @ v_bar[:, cols] + gpos @ v[:, cols])
            out = linear(torch.cat(heads, dim=1), mha.dense) + x[b]
            want[b] = F.layer_norm(out, (12,), mha.LayerNorm.weight, mha.LayerNorm.bias, 1e-12)
    torch.testing.assert_close(got, want)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an aten op allocates (views are not recorded)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not t._is_view():
                self.shapes.append(tuple(t.shape))
        return out


def test_only_the_position_term_is_quadratic_in_length() -> None:
    """Every allocated tensor with two L axes is the position term G, (H, L, L) with no batch
    axis; every other tensor grows by 2 when L doubles (O(B·L·(k + D)), not O(B·L²))."""
    B, H = 5, 2
    largest = {}
    for length in (16, 32, 64):
        model = toy_model(max_seq_len=length, n_layers=1).eval()
        seq = torch.randint(1, N_ITEMS + 1, (B, length))
        rec = ShapeRecorder()
        with torch.no_grad(), rec:
            model(seq, torch.full((B,), length))
        square = [s for s in rec.shapes if sum(d == length for d in s) >= 2]
        assert square and all(math.prod(s) == H * length * length for s in square), square
        largest[length] = max(math.prod(s) for s in rec.shapes if s not in square)
    assert largest[32] == 2 * largest[16] and largest[64] == 2 * largest[32], largest


def test_no_mask_padding_takes_part() -> None:
    model = toy_model(hidden_dropout=0.0, attn_dropout=0.0).eval()
    seq = torch.tensor([[3, 5, 7, 0, 0, 0, 0, 0]])
    lens = torch.tensor([3])
    later = seq.clone()
    later[0, 4] = 9  # a position after len - 1: seen (no causal mask)
    with torch.no_grad():
        out = model(seq, lens)
        assert not torch.allclose(out, model(later, lens))
        model.item_embedding.weight[0] += torch.randn(12)  # padding: seen (no padding mask)
        assert not torch.allclose(out, model(seq, lens))


def test_init_theta_std_one_rest_recbole() -> None:
    model = build_model("lightsans", n_items=500, max_seq_len=50, k_interests=40)
    theta = model.trm_encoder.layer[0].multi_head_attention.attpooling_key.theta
    assert abs(theta.std().item() - 1.0) < 0.1
    assert abs(model.item_embedding.weight.std().item() - 0.02) < 0.002
    mha = model.trm_encoder.layer[1].multi_head_attention
    assert mha.pos_q_linear.bias.abs().sum() == 0 and (mha.pos_ln.weight == 1).all()
    names = {n for n, _ in model.named_parameters()}
    assert "trm_encoder.layer.0.multi_head_attention.attpooling_value.theta" in names
    assert "trm_encoder.layer.1.feed_forward.dense_2.weight" in names


def test_loss_on_toy_batch_is_full_softmax_ce() -> None:
    model = toy_model().eval()
    batch = {
        "item_seq": torch.tensor([[3, 5, 0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]]),
        "seq_len": torch.tensor([2, 8]),
        "target": torch.tensor([7, 12]),
    }
    out = loss_terms(model, batch)
    with torch.no_grad():
        u = model(batch["item_seq"], batch["seq_len"]).double()
        logits = u @ model.item_embedding.weight.double().T  # (2, 13)
        want = -(logits.log_softmax(-1)[[0, 1], [7, 12]]).mean()
    torch.testing.assert_close(out["loss"].double(), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(full_scores(model, batch), logits.float())
    assert get_spec("lightsans").loss_terms is loss_terms


def test_overfits_tiny_set() -> None:
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(2, L + 1, (32,), generator=g)
    seq = torch.randint(1, N_ITEMS + 1, (32, L), generator=g) * (torch.arange(L) < lens[:, None])
    target = (seq[torch.arange(32), lens - 1] * 7) % N_ITEMS + 1  # a function of the last item
    batch = {"item_seq": seq, "seq_len": lens, "target": target}
    model = toy_model(hidden_size=32, inner_size=64, hidden_dropout=0.1, attn_dropout=0.1)
    opt = torch.optim.Adam(model.train().parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss = loss_terms(model, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first / 20, (first, loss.item())
