"""Building what a run trains: the model, its optimizer, its softmax and its starting weights.

Owns ``build_run_model`` (a model from its config plus non-config inputs such as S3Rec's
item-attribute table), ``start_from_pretrained`` (S3Rec's finetune stage, ``train.stage``),
``build_optimizer`` (Adam / AdamW, and lazy ``SparseAdam`` for the item table behind one
``SplitOptimizer``), ``build_softmax`` (the sampled softmax, or None for the full one),
``build_train_state`` (all of the above for a fresh run, from ``train.warm_start``'s weights
when set: ``warm_start.py``; ``check_warm_start`` is the driver's check of it) and
``rebuild_model`` (a checkpoint's model with its best weights: the one way ``evaluate
--checkpoint`` and ``export`` rebuild it).

Imports flow one way: this module reads checkpoints (``checkpoint.py``: state and files only),
never the reverse.
"""

from __future__ import annotations

from typing import Any

import torch

from fearec_dist.config import ExperimentConfig, TrainSection, config_from_saved
from fearec_dist.data.attributes import read_attribute_table
from fearec_dist.data.examples import ExamplesInfo, read_item_counts
from fearec_dist.models import build_model, get_spec
from fearec_dist.models.softmax import SampledSoftmax, SoftmaxOptions
from fearec_dist.models.spec import ModelSpec
from fearec_dist.train import checkpoint as ckpt
from fearec_dist.train.console import say
from fearec_dist.train.device import grad_scaler_for
from fearec_dist.train.distributed import build_gather_ids
from fearec_dist.train.progress import Progress
from fearec_dist.train.warm_start import (
    WarmStart,
    carry_optimizer,
    optimizer_param_names,
    plan_warm_start,
    warm_state_dict,
)


def model_inputs(spec: ModelSpec, cfg: ExperimentConfig, info: ExamplesInfo) -> dict[str, Any]:
    """Non-config constructor inputs: the item-attribute table for models that need one."""
    if not spec.needs_attributes:
        return {}
    table = read_attribute_table(info.prepared_uri, cfg.storage, info.n_items)
    if table is None:
        raise ValueError(
            f"model {cfg.model.name!r} needs item attributes, but the prepared dataset "
            f"{info.prepared_uri} has none: prepare it with --attributes (RecBole .item file "
            "or item2attributes.json), or set data.attributes"
        )
    return {"item_attributes": table}


def build_run_model(spec: ModelSpec, cfg: ExperimentConfig, info: ExamplesInfo) -> torch.nn.Module:
    """The bare model of a run, for the examples described by ``info`` (n_items, L)."""
    return build_model(
        cfg.model.name,
        n_items=info.n_items,
        max_seq_len=info.max_seq_len,
        **cfg.model.params,
        **model_inputs(spec, cfg, info),
    )


def start_from_pretrained(spec: ModelSpec, model: torch.nn.Module, cfg: ExperimentConfig) -> None:
    """S3Rec finetune: load the pretrained encoder, or say clearly that there is none."""
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


def softmax_options(t: TrainSection) -> SoftmaxOptions:
    """The sampled softmax's settings, out of the train section."""
    return SoftmaxOptions(
        n_negatives=t.n_negatives,
        sampler=t.negative_sampler,
        alpha=t.negative_alpha,
        in_batch=t.in_batch_negatives,
        logq=t.logq_correction,
        temperature=t.softmax_temperature,
        seed=t.seed,
    )


def build_softmax(
    cfg: ExperimentConfig, info: ExamplesInfo, device: torch.device
) -> SampledSoftmax | None:
    """The run's sampled softmax (``train.softmax: sampled``), or None for the full one. Its
    popularity counts are the training targets' (the examples' ``item_counts``), so no valid or
    test target reaches the sampler or the logQ correction."""
    t = cfg.train
    if t.softmax != "sampled" or t.stage == "pretrain":
        return None
    counts = read_item_counts(info, cfg.storage)
    gather_ids = build_gather_ids(t.gather_negatives)
    return SampledSoftmax(softmax_options(t), info.n_items, counts, device, gather_ids)


def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, sparse_items: bool = False
) -> Any:
    """Adam (spec §9); weight decay, when asked for, only on matrices (nanoGPT's grouping).

    ``sparse_items`` (``train.sparse_item_updates``): the item table gets ``SparseAdam`` (lazy
    Adam: only the rows a step touched move, and their moments; no weight decay) and every other
    parameter the optimizer above, both behind one ``SplitOptimizer``.
    """
    named = dict(model.named_parameters())
    dense_names, table_names = optimizer_param_names(model, weight_decay, sparse_items)
    params, table = [named[n] for n in dense_names], [named[n] for n in table_names]
    if weight_decay == 0:
        dense: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr)
    else:  # the order optimizer_param_names gives: matrices first (a warm start relies on it)
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        dense = torch.optim.AdamW(groups, lr=lr)
    if not table:
        return dense
    return SplitOptimizer(dense, torch.optim.SparseAdam(table, lr=lr))


class SplitOptimizer:
    """The dense optimizer and the item table's ``SparseAdam``, stepped and saved together."""

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer) -> None:
        self.dense, self.sparse = dense, sparse

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.dense.param_groups + self.sparse.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        self.sparse.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.dense.step()
        self.sparse.step()

    def state_dict(self) -> dict[str, Any]:
        return {"dense": self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"dense", "sparse"}:
            raise ValueError(
                "the checkpoint's optimizer was saved without train.sparse_item_updates: "
                "resume with the setting it was trained with"
            )
        self.dense.load_state_dict(state["dense"])
        self.sparse.load_state_dict(state["sparse"])


def state_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_warm_start(cfg: ExperimentConfig, info: ExamplesInfo) -> WarmStart | None:
    """The driver's check of ``train.warm_start`` before any worker starts: the source read and
    refused as ``build_train_state`` would (this run's model built on the meta device: shapes
    only, no memory). None without a warm start."""
    if not cfg.train.warm_start:
        return None
    spec = get_spec(cfg.model.name)
    with torch.device("meta"):
        shapes = state_shapes(build_run_model(spec, cfg, info))
    return plan_warm_start(cfg, info, shapes)


def start_warm(cfg: ExperimentConfig, info: ExamplesInfo, module: torch.nn.Module) -> WarmStart:
    """``train.warm_start``: ``module`` (freshly initialised) takes the source's weights, rows
    matched by raw id (``warm_start.py``)."""
    t = cfg.train
    if t.stage == "finetune" and t.pretrained:
        say(f"[fearec-dist] train.pretrained ({t.pretrained}) is not read: the warm start's "
            "weights replace it")  # fmt: skip
    warm = plan_warm_start(cfg, info, state_shapes(module))
    module.load_state_dict(warm_state_dict(module, warm))
    return warm


def build_train_state(
    spec: ModelSpec, cfg: ExperimentConfig, info: ExamplesInfo, device: torch.device, fresh: bool
) -> ckpt.TrainState:
    """The bare model on ``device``, its optimizer and an empty progress. A fresh run starts
    from ``train.warm_start`` when set (its optimizer state too with
    ``train.warm_start_optimizer``), else a fresh finetune from the pretrained encoder; a
    resumed run's state is restored afterwards (never warm-started again)."""
    t = cfg.train
    module = build_run_model(spec, cfg, info).to(device)
    warm = start_warm(cfg, info, module) if fresh and t.warm_start else None
    if warm is None and t.stage == "finetune" and fresh:
        start_from_pretrained(spec, module, cfg)
    if t.sparse_item_updates:  # row-sparse gradients of the item table (lookups and candidates)
        module.item_embedding.sparse = True
    optimizer = build_optimizer(module, t.lr, t.weight_decay, t.sparse_item_updates)
    if warm is not None and t.warm_start_optimizer:
        carry_optimizer(warm, module, optimizer, t.weight_decay, t.sparse_item_updates)
    return ckpt.TrainState(
        module,
        optimizer,
        Progress(),
        scaler=grad_scaler_for(device, t.amp),
        warm_start=None if warm is None else warm.record(t.warm_start_optimizer),
    )


def rebuild_model(
    state: dict[str, Any], source: str = "checkpoint"
) -> tuple[torch.nn.Module, ModelSpec, ExperimentConfig, ExamplesInfo]:
    """A checkpoint's model with its best validation weights (the last ones when it has no best
    yet), in eval mode, built as the trainer builds it (S3Rec's attribute table included).

    Args:
        state: a checkpoint dict (``checkpoint.load_state_uri``).
        source: where it came from, for config errors.

    Returns:
        (model, its ModelSpec, the run's ExperimentConfig, its ExamplesInfo).
    """
    cfg = config_from_saved(state["config"], f"{source} (checkpoint config)")
    info = ExamplesInfo.from_dict(state["data"].get("examples", state["data"]))  # or older
    spec = get_spec(cfg.model.name)
    model = build_run_model(spec, cfg, info)
    model.load_state_dict(state.get("best_model") or state["model"])
    return model.eval(), spec, cfg, info
