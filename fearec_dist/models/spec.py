"""The contract between a model module and the trainer: one typed ``ModelSpec`` per model.

Each model module (``sasrec.py``, ``fearec.py``, …) declares ``SPEC = ModelSpec(...)``; the
registry reads it, so nothing is looked up by name. Shapes: B batch, L max_seq_len, D hidden size,
V = n_items + 1 scored rows (padding 0 and the items).

Functions a spec carries, each taking the **bare** module (never a DDP wrapper; nothing in
``models/`` unwraps ``.module``):

- ``loss_terms(model, batch, gather=None, forward=None, softmax=None) -> {"loss": total, term:
  value, …}``: ``forward`` is the callable that runs the forward pass with gradient sync (the
  trainer passes its DDP wrapper; default: ``model`` itself). Attributes (config, tables) are
  read from ``model``; every forward of the loss goes through ``forward``. ``softmax`` is this
  step's sampled softmax (``softmax.StepSoftmax``: shared negatives, in-batch targets, logQ), or
  None for the full next-item CE over every item.
- ``pretrain_loss_terms`` (same signature), where a model has a pretraining stage (S3Rec).
- ``encode(model, batch) -> (B, D)``: the sequence representation that ranks the next item.
- ``item_table(model) -> (weights (V, D), bias (V,) or None)``: what ``encode`` is scored
  against; BERT4Rec has an output bias, the others none. Mask-token rows are not part of it.
- ``full_scores(model, batch) -> (B, V)``: ``encode @ weightsᵀ + bias``; padding column 0 is
  left to the caller.
- ``needs_partner(config) -> bool``: whether training batches carry a same-target partner
  (``pos_seq``/``pos_len``); FEARec decides from its ``contrast``.
- ``load_pretrained(model, state_dict)``: how a finetune run takes a pretrained state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fearec_dist.config import ConfigError

Batch = dict[str, torch.Tensor]
LossFn = Callable[..., dict[str, torch.Tensor]]


def encode_last(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's forward on the raw history: (B, D) at the prediction position."""
    return model(batch["item_seq"], batch["seq_len"])


def tied_item_table(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tied item embedding's first V = n_items + 1 rows (a mask row, if any, excluded)."""
    return model.item_embedding.weight[: model.n_items + 1], None


def never(config: Any) -> bool:
    return False


@dataclass(frozen=True)
class ModelSpec:
    """What the trainer, the evaluator and the exporter know about a model."""

    config_cls: type
    model_cls: type
    loss_terms: LossFn
    encode: Callable[[nn.Module, Batch], torch.Tensor] = encode_last
    item_table: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None]] = tied_item_table
    pretrain_loss_terms: LossFn | None = None
    needs_partner: Callable[[Any], bool] = never
    needs_attributes: bool = False
    load_pretrained: Callable[[nn.Module, dict[str, torch.Tensor]], Any] | None = None
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    removed_keys: Mapping[str, str] = field(default_factory=dict)  # old key -> what replaces it
    # filled in by the registry for the name asked for (a model or one of its presets)
    name: str = ""
    preset: Mapping[str, Any] = field(default_factory=dict)

    def full_scores(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(B, V) scores of every item row; column 0 (padding) is left to the caller."""
        return scores_against(self.encode(model, batch), *self.item_table(model))

    def stage_loss(self, stage: str) -> LossFn:
        """The loss of a training stage (``train.stage``): pretrain, or train/finetune."""
        if stage != "pretrain":
            return self.loss_terms
        if self.pretrain_loss_terms is None:
            raise ConfigError(f"train.stage: model {self.name!r} has no pretraining stage")
        return self.pretrain_loss_terms


def scores_against(
    seq_repr: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """(..., D) representations against (V, D) item rows -> (..., V) scores (+ bias)."""
    scores = seq_repr @ weights.T
    return scores if bias is None else scores + bias
