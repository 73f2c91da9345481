"""S3Rec's two stages (``train.stage``) and what a model needs beyond its config.

Owns ``build_run_model`` (the model of a run: its config keys plus non-config inputs such as the
item-attribute table) and ``start_from_pretrained`` (a finetune run takes the pretrained
encoder, or says clearly that there is none). Used by the training loop and by
``evaluate_checkpoint`` alike.
"""

from __future__ import annotations

from typing import Any

import torch

from fearec_dist.config import ExperimentConfig
from fearec_dist.models.spec import ModelSpec
from fearec_dist.train.console import say


def model_inputs(spec: ModelSpec, cfg: ExperimentConfig, info: dict[str, Any]) -> dict[str, Any]:
    """Non-config constructor inputs: the item-attribute table for models that need one."""
    if not spec.needs_attributes:
        return {}
    from fearec_dist.data.attributes import read_attribute_table

    table = read_attribute_table(info["prepared_uri"], cfg.storage, info["n_items"])
    if table is None:
        raise ValueError(
            f"model {cfg.model.name!r} needs item attributes, but the prepared dataset "
            f"{info['prepared_uri']} has none: prepare it with --attributes (RecBole .item file "
            "or item2attributes.json), or set data.attributes"
        )
    return {"item_attributes": table}


def build_run_model(
    spec: ModelSpec, cfg: ExperimentConfig, info: dict[str, Any]
) -> torch.nn.Module:
    """The bare model of a run, for the examples described by ``info`` (n_items, L)."""
    from fearec_dist.models import build_model

    return build_model(
        cfg.model.name,
        n_items=info["n_items"],
        max_seq_len=info["max_seq_len"],
        **cfg.model.params,
        **model_inputs(spec, cfg, info),
    )


def start_from_pretrained(spec: ModelSpec, model: torch.nn.Module, cfg: ExperimentConfig) -> None:
    """S3Rec finetune: load the pretrained encoder, or say clearly that there is none."""
    from fearec_dist.train import checkpoint as ckpt

    if cfg.train.pretrained:
        source = ckpt.latest_checkpoint(cfg.train.pretrained, cfg.storage)
        state = ckpt.load_state_uri(source, cfg.storage)
        if spec.load_pretrained is None:
            model.load_state_dict(state["model"], strict=False)
        else:
            spec.load_pretrained(model, state["model"])
        say(f"[fearec-dist] finetuning from the pretrained encoder in {source}")
        return
    if not cfg.train.allow_scratch:
        raise ValueError(
            "train.stage=finetune without train.pretrained: no pretrained checkpoint to start "
            "from. Run --set train.stage=pretrain first and pass its checkpoint as "
            "train.pretrained, or set train.allow_scratch=true to finetune from scratch."
        )
    say("[fearec-dist] finetuning from scratch (train.allow_scratch=true)")


def build_softmax(cfg: ExperimentConfig, info: dict[str, Any], device: torch.device) -> Any:
    """The run's sampled softmax (``train.softmax: sampled``), or None for the full one. Its
    popularity counts are the training targets' (the examples' ``item_counts``), so no valid or
    test target reaches the sampler or the logQ correction."""
    t = cfg.train
    if t.softmax != "sampled" or t.stage == "pretrain":
        return None
    from fearec_dist.data.examples import read_item_counts
    from fearec_dist.models.softmax import SampledSoftmax
    from fearec_dist.train.distributed import build_gather_ids

    counts = read_item_counts(info, cfg.storage)
    gather_ids = build_gather_ids(t.gather_negatives)
    return SampledSoftmax(t, info["n_items"], counts, device, gather_ids)
