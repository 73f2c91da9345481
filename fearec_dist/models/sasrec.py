"""SASRec (Kang & McAuley, ICDM 2018) as RecBole 1.2.1 implements it (spec/baselines.md).

Shapes: B batch, L max_seq_len, D hidden size, V = n_items + 1.

Causal self-attention over the right-padded history, the state at position len - 1, logits
against the tied item table, full-softmax CE. RecBole's FFN is a Linear pair (the original SASRec
uses 1×1 convolutions and BCE with one negative).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fearec_dist.models.layers import (
    SequentialBase,
    TransformerConfig,
    TransformerEncoder,
    causal_padding_mask,
    gather_last,
)
from fearec_dist.models.softmax import next_item_ce
from fearec_dist.models.spec import ModelSpec


@dataclass
class SASRecConfig(TransformerConfig):
    """SASRec has only the shared transformer keys."""


class SASRec(SequentialBase):
    """SASRec over ``n_items`` real items (item table has n_items + 1 rows, row 0 = padding).

    Example::

    model = SASRec(SASRecConfig(), n_items=1682, max_seq_len=50)
    seq_repr = model(item_seq, seq_len)  # (B, 64)
    """

    def __init__(self, config: SASRecConfig, n_items: int, max_seq_len: int) -> None:
        c = config
        super().__init__(
            n_items + 1, max_seq_len, c.hidden_size, c.hidden_dropout, c.layer_norm_eps
        )
        self.config, self.n_items = config, n_items
        self.trm_encoder = TransformerEncoder.from_config(c)
        self.init_parameters()

    def forward(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """item_seq (B, L) right-padded, lengths (B,) -> seq_repr (B, D) at position len - 1."""
        hidden = self.trm_encoder(self.embed(item_seq), causal_padding_mask(item_seq))
        return gather_last(hidden, lengths)  # (B, D)


def loss_terms(
    model: SASRec, batch: dict[str, torch.Tensor], gather=None, forward=None, softmax=None
) -> dict[str, torch.Tensor]:
    """Full-softmax CE (baselines.md). ``gather`` is unused (no contrastive term).

    Args:
        model: the bare SASRec; ``forward``: the forward with gradient sync (DDP), default
            ``model``. batch: ``item_seq`` (B, L), ``seq_len`` (B,), ``target`` (B,).

    Returns:
        ``{"loss": ce, "ce": ce}``, the mean over this worker's rows.
    """
    forward = model if forward is None else forward  # not `or`: a compiled module has no bool()
    seq_repr = forward(batch["item_seq"], batch["seq_len"])  # (B, D)
    ce = next_item_ce(model, seq_repr, batch["target"], softmax)
    return {"loss": ce, "ce": ce}


SPEC = ModelSpec(config_cls=SASRecConfig, model_cls=SASRec, loss_terms=loss_terms)

full_scores = SPEC.full_scores  # (B, V) scores; DESIGN.md: every model module exposes it
