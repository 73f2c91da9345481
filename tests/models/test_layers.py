"""Shared transformer parts: dropout masks, attention masks, init, last-position gather."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fearec_dist.models.layers import (
    MASK_VALUE,
    Dropout,
    causal_padding_mask,
    dropout_mask,
    gather_last,
    init_weights,
    padding_mask,
)


@pytest.mark.parametrize("p", [0.5, 0.25, 0.1, 0.2, 0.3])
def test_dropout_mask_keep_rate_and_scale(p: float) -> None:
    torch.manual_seed(0)
    mask = dropout_mask(torch.Size([200_000]), p, torch.float32)
    kept = mask > 0
    assert abs(kept.float().mean().item() - (1 - p)) < 4e-3
    scale = mask[kept].unique()
    assert scale.numel() == 1 and scale.item() == pytest.approx(1 / (1 - p), rel=1e-4)


def test_dropout_mask_is_unbiased_and_uses_every_lane() -> None:
    torch.manual_seed(0)
    mask = dropout_mask(torch.Size([31 * 4000]), 0.5, torch.float32).view(-1, 31)
    per_lane = (mask > 0).float().mean(dim=0)  # bit i of every 31-bit draw
    assert ((per_lane - 0.5).abs() < 0.03).all()
    assert mask.mean().item() == pytest.approx(1.0, abs=0.01)


def test_dropout_module_semantics() -> None:
    drop = Dropout(0.5)
    x = torch.ones(4, 50, 64)
    a, b = drop(x), drop(x)
    assert not torch.equal(a, b)  # a fresh mask on every call
    assert set(a.unique().tolist()) <= {0.0, 2.0}
    drop.eval()
    assert drop(x) is x
    y = torch.randn(3, 7, requires_grad=True)
    out = Dropout(0.25)(y)
    out.sum().backward()
    torch.testing.assert_close(y.grad, (out / y).detach())  # d out / d y = mask


def test_masks() -> None:
    seq = torch.tensor([[5, 6, 0]])
    causal = causal_padding_mask(seq)
    assert causal.shape == (1, 1, 3, 3)
    allowed = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    torch.testing.assert_close(causal[0, 0], torch.where(allowed, 0.0, MASK_VALUE))
    assert padding_mask(seq).tolist() == [[[[0.0, 0.0, MASK_VALUE]]]]


def test_init_weights() -> None:
    torch.manual_seed(0)
    emb, lin, ln = nn.Embedding(500, 64, padding_idx=0), nn.Linear(64, 64), nn.LayerNorm(64)
    for m in (emb, lin, ln):
        init_weights(m, 0.02)
    assert emb.weight[0].abs().sum() > 0  # the padding row is overwritten too (spec §1)
    assert emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert lin.bias.abs().sum() == 0 and (ln.weight == 1).all() and (ln.bias == 0).all()


def test_gather_last() -> None:
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    assert gather_last(hidden, torch.tensor([1, 3])).tolist() == [[0.0, 1.0], [10.0, 11.0]]
