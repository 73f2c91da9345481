"""BERT4Rec (spec baselines.md): masking statistics and slots, the prediction input, the masked
CE on a toy batch against a hand-computed value, the pitfall flags, and overfitting."""

from __future__ import annotations

import math

import pytest
import torch

from fearec_dist.config import ConfigError
from fearec_dist.models import build_model, get_spec
from fearec_dist.models.bert4rec import build_eval_input, full_scores, loss_terms, mask_item_seq

N_ITEMS, L = 12, 10
M = N_ITEMS + 1  # mask token id


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/models/conftest.py


def toy_model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        "bert4rec", n_items=N_ITEMS, max_seq_len=L, hidden_size=16, inner_size=32, **kw
    )


def random_histories(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, L + 1, (n,), generator=g)
    seq = torch.randint(1, N_ITEMS + 1, (n, L), generator=g)
    return seq * (torch.arange(L)[None, :] < lens[:, None]), lens


def reference_slots(seq: list[int], masked: list[int], k: int) -> tuple[list[int], list[int]]:
    """RecBole's per-row loop: record (item, index) at each masked position, left-pad to K with
    0 and keep the last K."""
    labels = [s for s, x in zip(seq, masked) if s and x == M]
    index = [t for t, (s, x) in enumerate(zip(seq, masked)) if s and x == M]
    return ([0] * k + labels)[-k:], ([0] * k + index)[-k:]


def test_random_mode_mask_rate_and_slots_match_recbole_loop() -> None:
    seq, lens = random_histories(4000)
    torch.manual_seed(1)
    masked, labels, index = mask_item_seq(seq, lens, M, 0.2, 0.0, n_slots=2)
    real = seq > 0
    assert (masked[~real] == 0).all() and ((masked == seq) | (masked == M)).all()
    rate = (masked[real] == M).float().mean().item()
    assert abs(rate - 0.2) < 0.01  # ~24k real positions: sd 0.0026
    per_pos = [(masked[:, t][real[:, t]] == M).float().mean().item() for t in range(L)]
    assert max(abs(r - 0.2) for r in per_pos) < 0.05  # every position, the first included
    for i in range(200):  # K = 2 < masked count in many rows: only the last K are kept
        want_labels, want_index = reference_slots(seq[i].tolist(), masked[i].tolist(), 2)
        assert labels[i].tolist() == want_labels and index[i].tolist() == want_index
    assert ((masked == M).sum(1) > 2).any()


def test_last_mode_masks_each_rows_last_item() -> None:
    seq = torch.tensor([[3, 5, 7, 0], [1, 2, 3, 4], [9, 0, 0, 0]])
    lens = torch.tensor([3, 4, 1])
    masked, labels, index = mask_item_seq(seq, lens, M, 0.2, 1.0, n_slots=3)
    assert masked.tolist() == [[3, 5, M, 0], [1, 2, 3, M], [M, 0, 0, 0]]
    assert labels.tolist() == [[0, 0, 7], [0, 0, 4], [0, 0, 9]]
    assert index.tolist() == [[0, 0, 2], [0, 0, 3], [0, 0, 0]]  # row 3: index 0, no loss


def test_ft_ratio_is_one_draw_per_batch() -> None:
    seq, lens = random_histories(8, seed=3)
    lens = lens.clamp(min=6)  # random mode almost never masks exactly the last item of all rows
    seq = seq.where(seq > 0, 1) * (torch.arange(L)[None, :] < lens[:, None])
    torch.manual_seed(2)
    n_last = 0
    for _ in range(800):
        masked, _, _ = mask_item_seq(seq, lens, M, 0.2, 0.3, n_slots=2)
        is_last = masked.eq(M).sum(1).eq(1).all() & masked[torch.arange(8), lens - 1].eq(M).all()
        n_last += int(is_last)
    assert abs(n_last / 800 - 0.3) < 0.06  # sd 0.016


def test_eval_input_appends_mask_after_dropping_first_item() -> None:
    seq = torch.tensor([[3, 5, 7, 0, 0], [1, 2, 3, 4, 5], [6, 0, 0, 0, 0]])
    lens = torch.tensor([3, 5, 1])
    inp, pos = build_eval_input(seq, lens, M)
    assert inp.tolist() == [[5, 7, M, 0, 0], [2, 3, 4, 5, M], [M, 0, 0, 0, 0]]
    assert pos.tolist() == [2, 4, 0]
    inp, pos = build_eval_input(seq, lens, M, keep_first_item=True)  # pitfall 4 fixed
    assert inp.tolist() == [[3, 5, 7, M, 0], [2, 3, 4, 5, M], [6, M, 0, 0, 0]]
    assert pos.tolist() == [3, 4, 1]


def test_full_scores_read_the_mask_position_with_bias_and_no_mask_row() -> None:
    model = toy_model().eval()
    with torch.no_grad():
        model.output_bias.normal_()
    seq = torch.tensor([[3, 5, 7] + [0] * 7, list(range(1, 11))])
    lens = torch.tensor([3, 10])
    with torch.no_grad():
        scores = full_scores(model, {"item_seq": seq, "seq_len": lens, "target": lens})
        inp = torch.tensor([[5, 7, M] + [0] * 7, list(range(2, 11)) + [M]])
        out = model.encode(inp)[[0, 1], [2, 9]]  # (2, D) at the mask
        want = out @ model.item_embedding.weight[: N_ITEMS + 1].T + model.output_bias
    assert scores.shape == (2, N_ITEMS + 1) and model.item_embedding.weight.shape[0] == N_ITEMS + 2
    torch.testing.assert_close(scores, want)


def test_bidirectional_but_padding_blind() -> None:
    model = toy_model(hidden_dropout=0.0, attn_dropout=0.0).eval()
    seq = torch.tensor([[3, 5, M, 7, 0, 0, 0, 0, 0, 0]])
    later = seq.clone()
    later[0, 3] = 8
    with torch.no_grad():
        out = model.encode(seq)[0, 2]
        assert not torch.allclose(out, model.encode(later)[0, 2])  # sees later items
        model.item_embedding.weight[0] += 5.0
        torch.testing.assert_close(model.encode(seq)[0, 2], out)  # padding keys masked


def test_loss_on_toy_batch_is_ce_over_labelled_slots() -> None:
    model = toy_model().eval()
    with torch.no_grad():
        model.output_bias.normal_()
    seq, lens = random_histories(6, seed=5)
    batch = {"item_seq": seq, "seq_len": lens, "target": lens}
    torch.manual_seed(7)
    out = loss_terms(model, batch)
    torch.manual_seed(7)
    masked, labels, index = mask_item_seq(seq, lens, M, 0.2, 0.5, n_slots=2)
    with torch.no_grad():
        o = model.encode(masked).double()  # (B, L, D)
        table = model.item_embedding.weight[: N_ITEMS + 1].double()
        total, count = 0.0, 0
        for b in range(6):
            for s in range(2):
                if index[b, s] > 0:
                    logits = o[b, index[b, s]] @ table.T + model.output_bias.double()
                    total -= logits.log_softmax(-1)[labels[b, s]].item()
                    count += 1
    assert count > 0
    assert math.isclose(out["loss"].item(), total / count, rel_tol=1e-5)
    assert not out["ce"].requires_grad and out["loss"].requires_grad
    assert get_spec("bert4rec").loss_terms is loss_terms


def test_pitfalls_position_zero_and_empty_batch() -> None:
    batch = {"item_seq": torch.tensor([[4] + [0] * 9] * 3), "seq_len": torch.ones(3).long()}
    assert math.isnan(loss_terms(toy_model(ft_ratio=1.0), batch)["loss"].item())  # pitfall 2
    assert loss_terms(toy_model(ft_ratio=1.0, guard_empty_batch=True), batch)["loss"].item() == 0
    fixed = loss_terms(toy_model(ft_ratio=1.0, train_position_zero=True), batch)["loss"]
    assert math.isfinite(fixed.item()) and fixed.item() > 0  # pitfall 1 fixed


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="model.mask_ratio"):
        build_model("bert4rec", n_items=5, max_seq_len=4)  # int(0.2 · 4) = 0 slots
    with pytest.raises(ConfigError, match="model.ft_ratio"):
        build_model("bert4rec", n_items=5, max_seq_len=10, ft_ratio=1.5)


def test_overfits_tiny_set() -> None:
    """Runs of consecutive items: every masked item is determined by its neighbours."""
    g = torch.Generator().manual_seed(0)
    n_items, seq_len = 30, 10
    start = torch.randint(1, n_items - seq_len + 1, (32,), generator=g)
    lens = torch.randint(4, seq_len + 1, (32,), generator=g)
    seq = (start[:, None] + torch.arange(seq_len)) * (torch.arange(seq_len) < lens[:, None])
    batch = {"item_seq": seq, "seq_len": lens, "target": lens}
    torch.manual_seed(0)
    model = build_model(
        "bert4rec",
        n_items=n_items,
        max_seq_len=seq_len,
        hidden_size=32,
        inner_size=64,
        hidden_dropout=0.0,
        attn_dropout=0.0,
        mask_ratio=0.3,
    ).train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(200):
        loss = loss_terms(model, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = losses[0], sum(losses[-20:]) / 20  # masks differ per step: average the tail
    assert last < first / 10, (first, last)
