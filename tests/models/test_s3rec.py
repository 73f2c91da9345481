"""S3Rec (spec s3rec.md): the pretraining batch (§3), each objective's sum on a toy batch against
a hand-computed value (§4), attribute inputs and errors, finetune CE (§5), overfitting, and the
pretrain -> state dict -> finetune round trip."""

from __future__ import annotations

import io
import math

import pytest
import torch

from fearec_dist.config import ConfigError
from fearec_dist.models import build_model, get_spec
from fearec_dist.models.s3rec import (
    build_pretrain_batch,
    encoder_state_dict,
    full_scores,
    load_pretrained,
    loss_terms,
    pretrain_loss_terms,
    pretrain_objectives,
    to_left_padding,
)

N_ITEMS, L, A = 10, 6, 4
M = N_ITEMS + 1  # mask token id


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/models/conftest.py


def attribute_table() -> torch.Tensor:
    """(N_ITEMS + 1, 2) ids 1..A: item i has attribute i % A + 1, even items also attribute 1."""
    items = torch.arange(N_ITEMS + 1)
    table = torch.stack([items % A + 1, torch.where(items % 2 == 0, 1, 0)], dim=1)
    table[0] = 0
    return table


def attrs_of(item: int) -> set[int]:
    return {int(a) for a in attribute_table()[item] if a > 0}


def toy_model(stage: str = "pretrain", seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    args = dict(hidden_size=8, inner_size=16) | kw  # the stage is the loss used (train.stage)
    return build_model(
        "s3rec", n_items=N_ITEMS, max_seq_len=L, item_attributes=attribute_table(), **args
    )


def histories(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, L + 1, (n,), generator=g)
    seq = torch.randint(1, N_ITEMS + 1, (n, L), generator=g)
    return seq * (torch.arange(L) < lens[:, None]), lens


def test_pretrain_batch_follows_recbole_construction() -> None:
    seq, lens = histories(3000)
    torch.manual_seed(0)
    p = build_pretrain_batch(seq, lens, M, 0.2, left_pad=False)
    real = torch.arange(L) < lens[:, None]
    chosen = p["masked"] == M
    assert (p["pos"] == seq).all() and (p["masked"][~chosen] == seq[~chosen]).all()
    assert abs(chosen[real].float().mean().item() - 0.2) < 0.01
    negs = p["neg"][chosen]
    assert ((negs >= 1) & (negs <= M)).all() and (negs == M).any()  # mask id drawn (pitfall 4)
    in_row = (p["neg"][:, :, None] == seq[:, None, :]).any(-1)
    assert not (in_row & chosen).any()
    assert (p["last"] == lens - 1).all()
    seq, lens = histories(40, seed=1)  # segment structure, row by row
    torch.manual_seed(0)
    p = build_pretrain_batch(seq, lens, M, 0.2, left_pad=False)
    long = seq[torch.arange(L) < lens[:, None]]
    for b in range(40):
        m, x = int(lens[b]), seq[b].tolist()
        rows = [p[k][b].tolist() for k in ("masked_seg", "pos_seg", "neg_seg")]
        if m < 2:
            assert rows == [x, x, x]
            continue
        seg = [t for t in range(m) if rows[0][t] == M]
        a, ell = seg[0], len(seg)
        assert seg == list(range(a, a + ell)) and 1 <= ell <= m // 2
        assert rows[1] == [M] * a + x[a : a + ell] + [M] * (m - a - ell) + [0] * (L - m)
        neg = rows[2][a : a + ell]
        starts = [s for s in range(len(long) - ell + 1) if long[s : s + ell].tolist() == neg]
        assert starts and rows[2][:a] == [M] * a and rows[2][a + ell : m] == [M] * (m - a - ell)
    torch.manual_seed(0)
    left = build_pretrain_batch(seq, lens, M, 0.2, left_pad=True)
    for key in ("masked", "pos", "neg", "masked_seg", "pos_seg", "neg_seg"):
        assert (left[key] == to_left_padding(p[key], lens)).all()
    assert (left["last"] == L - 1).all()
    assert to_left_padding(torch.tensor([[4, 5, 0, 0]]), torch.tensor([2])).tolist() == [
        [0, 0, 4, 5]
    ]


def bce(z: float, t: float) -> float:
    return -t * math.log(1 / (1 + math.exp(-z))) - (1 - t) * math.log(1 - 1 / (1 + math.exp(-z)))


def test_each_objective_matches_the_spec_formula() -> None:
    model = toy_model().double().eval()
    parts = {  # left-padded, hand-made: row 0 masks positions 3 and 5, row 1 position 4
        "masked": torch.tensor([[0, 0, 3, M, 5, M], [0, 0, 0, 2, M, 9]]),
        "pos": torch.tensor([[0, 0, 3, 4, 5, 6], [0, 0, 0, 2, 8, 9]]),
        "neg": torch.tensor([[0, 0, 3, 7, 5, 1], [0, 0, 0, 2, 10, 9]]),
        "masked_seg": torch.tensor([[0, 0, 3, M, M, 6], [0, 0, 0, 2, 8, M]]),
        "pos_seg": torch.tensor([[0, 0, M, 4, 5, M], [0, 0, 0, M, M, 9]]),
        "neg_seg": torch.tensor([[0, 0, M, 2, 8, M], [0, 0, 0, M, M, 4]]),
        "last": torch.tensor([L - 1, L - 1]),
    }
    got = pretrain_objectives(model, parts)
    sig = torch.sigmoid
    with torch.no_grad():
        h = model(parts["masked"], None, pretrain=True)  # (2, L, D)
        enc_last = {k: model(parts[k], None, pretrain=True)[:, -1] for k in list(parts)[3:6]}
        w = model.feature_embedding.weight  # (A, D)
        emb = model.item_embedding.weight
        want = dict.fromkeys(("aap", "mip", "map", "sp"), 0.0)
        for b in range(2):
            for t in range(L):
                x, item = int(parts["masked"][b, t]), int(parts["pos"][b, t])
                if x == 0:
                    continue
                head = "map" if x == M else "aap"
                z = getattr(model, f"{head}_norm")(h[b, t]) @ w.T  # (A,)
                want[head] += sum(
                    bce(z[a].item(), float(a + 1 in attrs_of(item))) for a in range(A)
                )
                if x == M:
                    s = model.mip_norm(h[b, t])
                    p_pos = sig(s @ emb[item]).item()
                    p_neg = sig(s @ emb[int(parts["neg"][b, t])]).item()
                    want["mip"] += bce(p_pos - p_neg, 1.0)
            c = model.sp_norm(enc_last["masked_seg"][b])
            q_pos = sig(c @ enc_last["pos_seg"][b]).item()
            q_neg = sig(c @ enc_last["neg_seg"][b]).item()
            want["sp"] += bce(q_pos - q_neg, 1.0)
    for key, value in want.items():
        assert math.isclose(got[key].item(), value, rel_tol=1e-9), (key, got[key], value)


def test_pretrain_loss_is_the_weighted_sum() -> None:
    model = toy_model(aap_weight=0.3, mip_weight=0.7, map_weight=1.1, sp_weight=0.5).eval()
    seq, lens = histories(5, seed=2)
    torch.manual_seed(3)
    out = pretrain_loss_terms(model, {"item_seq": seq, "seq_len": lens, "target": lens})
    torch.manual_seed(3)
    terms = pretrain_objectives(model, build_pretrain_batch(seq, lens, M, 0.2, left_pad=True))
    want = 0.3 * terms["aap"] + 0.7 * terms["mip"] + 1.1 * terms["map"] + 0.5 * terms["sp"]
    torch.testing.assert_close(out["loss"], want)
    assert set(out) == {"loss", "aap", "mip", "map", "sp"} and not out["aap"].requires_grad
    assert get_spec("s3rec").needs_attributes and get_spec("s3rec").pretrain_loss_terms


def test_attribute_inputs_and_errors() -> None:
    ids = toy_model()
    hot = torch.zeros(N_ITEMS + 1, A, dtype=torch.bool)
    for item in range(1, N_ITEMS + 1):
        for a in attrs_of(item):
            hot[item, a - 1] = True
    torch.manual_seed(0)
    multi = build_model("s3rec", n_items=N_ITEMS, max_seq_len=L, item_attributes=hot)
    items = torch.tensor([[0, 1, 2, 7]])
    torch.testing.assert_close(ids.attribute_targets(items), multi.attribute_targets(items))
    assert ids.attribute_targets(items)[0].tolist() == [
        [0] * 4,
        [0, 1, 0, 0],
        [1, 0, 1, 0],
        [0, 0, 0, 1],
    ]
    assert ids.n_attributes == A and ids.feature_embedding.weight.shape == (A, 8)
    with pytest.raises(ConfigError, match=r"model\.stage.*train\.stage.*--stage"):
        build_model("s3rec", n_items=N_ITEMS, max_seq_len=L, stage="pretrain")
    plain = build_model("s3rec", n_items=N_ITEMS, max_seq_len=L)  # finetune needs none
    batch = {"item_seq": items, "seq_len": torch.tensor([4])}
    with pytest.raises(ConfigError, match="needs item attributes"):
        pretrain_loss_terms(plain, batch)
    with pytest.raises(ConfigError, match="rows"):
        build_model("s3rec", n_items=N_ITEMS + 1, max_seq_len=L, item_attributes=hot)
    with pytest.raises(ConfigError, match="model.stage"):
        build_model("s3rec", n_items=N_ITEMS, max_seq_len=L, stage="both")


def test_finetune_is_causal_ce_with_mask_row_in_training_only() -> None:
    model = toy_model("finetune").eval()
    batch = {
        "item_seq": torch.tensor([[3, 5, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6]]),
        "seq_len": torch.tensor([2, 6]),
        "target": torch.tensor([7, 10]),
    }
    with torch.no_grad():
        out = loss_terms(model, batch)
        u = model(batch["item_seq"], batch["seq_len"]).double()
        logits = u @ model.item_embedding.weight.double().T  # (2, N_ITEMS + 2): mask row too
        want = -(logits.log_softmax(-1)[[0, 1], [7, 10]]).mean()
        later = batch["item_seq"].clone()
        later[0, 2:] = 9  # items after len - 1 are invisible (causal + padding mask)
        torch.testing.assert_close(model(later, batch["seq_len"])[0], u[0].float())
        scores = full_scores(model, batch)
    assert logits.shape == (2, N_ITEMS + 2) and scores.shape == (2, N_ITEMS + 1)
    loss_terms(model, batch)["loss"].backward()  # DDP needs a grad for every parameter
    assert all(p.grad is not None for p in model.parameters())
    assert model.aap_norm.weight.grad.abs().sum() == 0
    torch.testing.assert_close(out["loss"].double(), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(scores, logits[:, : N_ITEMS + 1].float())


def train(model, fn, batch, steps: int, lr: float) -> list[float]:
    opt = torch.optim.Adam(model.train().parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = fn(model, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_finetune_overfits_tiny_set() -> None:
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(2, L + 1, (32,), generator=g)
    seq = torch.randint(1, N_ITEMS + 1, (32, L), generator=g) * (torch.arange(L) < lens[:, None])
    target = (seq[torch.arange(32), lens - 1] * 7) % N_ITEMS + 1
    batch = {"item_seq": seq, "seq_len": lens, "target": target}
    model = toy_model("finetune", hidden_size=32, inner_size=64, hidden_dropout=0.1)
    losses = train(model, loss_terms, batch, steps=150, lr=1e-2)
    assert losses[-1] < losses[0] / 20, (losses[0], losses[-1])


def test_pretrain_then_finetune_round_trip() -> None:
    seq, lens = histories(32, seed=4)
    batch = {"item_seq": seq, "seq_len": lens, "target": (seq[:, 0] % N_ITEMS) + 1}
    pre = toy_model("pretrain", hidden_size=16, inner_size=32, hidden_dropout=0.1)
    torch.manual_seed(5)
    first = pretrain_loss_terms(pre.eval(), batch)
    train(pre, pretrain_loss_terms, batch, steps=60, lr=1e-2)
    torch.manual_seed(5)  # the same masks and segments, no dropout
    last = pretrain_loss_terms(pre.eval(), batch)
    # AAP (attributes of visible items) overfits; MAP on random histories and the weak
    # difference-of-sigmoids MIP/SP (pitfall 5) move little in 60 steps
    assert last["aap"] < first["aap"] / 50 and last["loss"] < first["loss"] / 1.5
    buf = io.BytesIO()  # as the trainer's checkpoint would carry it
    torch.save(encoder_state_dict(pre), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    fine = toy_model("finetune", seed=1, hidden_size=16, inner_size=32)
    assert not torch.equal(
        fine.trm_encoder.layer[0].feed_forward.dense_1.weight,
        pre.trm_encoder.layer[0].feed_forward.dense_1.weight,
    )
    loaded = load_pretrained(fine, state)
    assert "trm_encoder.layer.1.multi_head_attention.query.weight" in loaded
    for name, p in fine.state_dict().items():
        torch.testing.assert_close(p, pre.state_dict()[name], rtol=0, atol=0)
    before = fine.item_embedding.weight.detach().clone()
    train(fine, loss_terms, batch, steps=2, lr=1e-3)  # finetuning moves on from there
    assert not torch.equal(fine.item_embedding.weight, before)
    plain = build_model("s3rec", n_items=N_ITEMS, max_seq_len=L, hidden_size=16, inner_size=32)
    load_pretrained(plain, state)  # no attributes: the feature embedding is skipped
    torch.testing.assert_close(plain.item_embedding.weight, pre.item_embedding.weight)
    other = build_model("s3rec", n_items=N_ITEMS + 2, max_seq_len=L, hidden_size=16, inner_size=32)
    with pytest.raises(ConfigError, match="item_embedding.weight has shape"):
        load_pretrained(other, state)  # pitfall 7: another dataset
