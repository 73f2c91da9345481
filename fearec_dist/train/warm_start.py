"""Warm starts (``train.warm_start``): a fresh run starts from an earlier model's weights, on a
newer version of the same dataset.

    source: a run dir (its newest complete checkpoint) | a checkpoint dir | an export dir
      -> its best-validation weights (an export: its encoder's weights), model, L, the
         dataset lineage {"uri", "version"} and the raw ids of its items (and attributes)
      -> refused, naming both sides: another dataset (another root URI), a newer version than
         this run's, another model, any shape that differs other than in the item count
      -> item rows matched by RAW id: each item in both vocabularies gets the source's row, a
         new item keeps its fresh initialisation (as a cold start's), the padding row 0 and
         the rows after the items (BERT4Rec's and S3Rec's [MASK]) map to theirs; S3Rec's
         attribute table likewise by raw attribute token; every other parameter is copied
      -> [train.warm_start_optimizer] the optimizer's state, per-row moments remapped the same
         way (zeros for new rows), Adam's and SparseAdam's alike

Ids are stable across versions of a dataset, so the match is the identity for old items; it is
made through the raw ids anyway (a dataset prepared again numbers its items afresh). The padding
row is copied although it is no item: it never gets a lookup gradient but shapes the output of
FEARec (its FFT runs over padded positions) and LightSANs, and the full softmax trains it as a
class; a fresh one would change the model's scores on old items.

Every rank reads the same source and builds the same weights; the rows of new items are drawn
by each rank's own seed, and DDP's start-up broadcast (or ``keep_table_out_of_ddp``) gives every
rank rank 0's. ``check_same_start`` checks it after the wrap. A resumed run restores its own
checkpoint (which carries this module's record) and never warm-starts again.

Shapes: N_s, N the items of the source and of this run, D hidden size, A attributes.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from fearec_dist.config import ConfigError, ExperimentConfig
from fearec_dist.data.examples import ExamplesInfo
from fearec_dist.data.merge import read_item_vocab
from fearec_dist.models import build_config, get_spec
from fearec_dist.storage import exists, storage_root
from fearec_dist.train.distributed import SPARSE_TABLE
from fearec_dist.train.warm_source import WarmSource, read_raw_vocab, read_source

ITEM_TABLES = ("item_embedding.weight", "output_bias")  # rows: padding, items, [extra rows]
ATTRIBUTE_TABLES = ("feature_embedding.weight",)  # S3Rec: row r is attribute id r + 1


@dataclass(frozen=True)
class RowMap:
    """Rows present in both vocabularies: this run's ids ``dst`` (K,) take the source's ids
    ``src`` (K,) (1-based ids, as in the vocabularies)."""

    dst: np.ndarray
    src: np.ndarray
    n_dst: int
    n_src: int

    @property
    def added(self) -> int:
        return self.n_dst - len(self.dst)


def match_rows(src_raw: Any, dst_raw: Any) -> RowMap:
    """Matches two vocabularies by raw id (``pyarrow.compute.index_in``: a hash join, no
    Python dict per item).

    Args:
        src_raw, dst_raw: (N_s,), (N,) raw ids of ids 1..N_s and 1..N (lists or Arrow arrays).
    """
    src = pa.array(src_raw, pa.string()) if not isinstance(src_raw, pa.Array) else src_raw
    dst = pa.array(dst_raw, pa.string()) if not isinstance(dst_raw, pa.Array) else dst_raw
    where = pc.index_in(dst.cast(pa.string()), value_set=src.cast(pa.string()))
    found = where.is_valid().to_numpy(zero_copy_only=False)
    src_ids = where.filter(where.is_valid()).to_numpy(zero_copy_only=False).astype(np.int64) + 1
    return RowMap(np.flatnonzero(found).astype(np.int64) + 1, src_ids, len(dst), len(src))


def _config_differences(source: WarmSource, cfg: ExperimentConfig) -> list[str]:
    """``key a (source) vs b (this run)`` for every model key whose value differs."""
    a = asdict(build_config(source.model, source.model_params))
    b = asdict(build_config(cfg.model.name, cfg.model.params))
    return [f"model.{k} {a[k]!r} (source) vs {b.get(k)!r} (this run)"
            for k in sorted(a) if a[k] != b.get(k)]  # fmt: skip


def check_source(
    source: WarmSource, cfg: ExperimentConfig, info: ExamplesInfo, shapes: dict[str, tuple]
) -> None:
    """Refuses a source this run cannot start from, naming both sides.

    Args:
        shapes: this run's model's state-dict shapes (a model on the meta device will do).

    Raises:
        ConfigError: another dataset or a newer version of it, another model, another L, other
            shapes than the item count (the parameter and both shapes named), a head count that
            differs, or ``train.warm_start_optimizer`` with an export.
    """
    here, there = info.data, source.data
    name = f"train.warm_start: {source.path}"
    if storage_root(str(there.get("uri"))) != storage_root(str(here["uri"])):
        raise ConfigError(
            f"{name} was trained on dataset {there.get('uri')} (version {there.get('version')}); "
            f"this run reads dataset {here['uri']} (version {here['version']}): a warm start "
            "continues the same dataset on a newer version of it"
        )
    if int(there.get("version") or 0) > int(here["version"]):
        raise ConfigError(
            f"{name} was trained on version {there['version']} of {here['uri']}, newer than the "
            f"version {here['version']} this run reads (data.version): start from a model of an "
            "older or the same version"
        )
    if get_spec(source.model).model_cls is not get_spec(cfg.model.name).model_cls:
        raise ConfigError(
            f"{name} is a {source.model!r} model; this run trains {cfg.model.name!r} "
            "(model.name): a warm start keeps the model"
        )
    if source.max_seq_len != info.max_seq_len:
        raise ConfigError(
            f"{name} was trained with data.max_seq_len {source.max_seq_len}, this run has "
            f"{info.max_seq_len} (position_embedding.weight: ({source.max_seq_len}, D) vs "
            f"({info.max_seq_len}, D))"
        )
    differs = _config_differences(source, cfg)
    hint = f" (model keys that differ: {'; '.join(differs)})" if differs else ""
    own, theirs = set(shapes), set(source.weights)
    if own != theirs:
        raise ConfigError(
            f"{name} has other parameters than this run's model: only in the source "
            f"{sorted(theirs - own)[:4]}, only in this run {sorted(own - theirs)[:4]}{hint}"
        )
    for key, shape in shapes.items():
        src = tuple(source.weights[key].shape)
        rows_only = key in ITEM_TABLES + ATTRIBUTE_TABLES  # the item (attribute) count may grow
        if (src[1:] != tuple(shape[1:])) if rows_only else (src != tuple(shape)):
            raise ConfigError(
                f"{name}: parameter {key} has shape {src} in the source, {tuple(shape)} in this "
                f"run{hint}"
            )
    heads = [d for d in differs if d.startswith("model.n_heads ")]
    if heads:  # same shapes, but the copied matrices would be split into other heads
        raise ConfigError(f"{name}: the attention heads differ: {heads[0]}")
    if cfg.train.warm_start_optimizer and source.kind == "export":
        raise ConfigError(
            f"train.warm_start_optimizer: true, but {source.path} is an export (weights only); "
            "name the run or checkpoint it came from, or set train.warm_start_optimizer: false"
        )
    if cfg.train.warm_start_optimizer and not source.optimizer:
        raise ConfigError(f"train.warm_start_optimizer: {source.path} holds no optimizer state")


def row_pairs(
    key: str, n_rows: int, src_rows: int, items: RowMap, attrs: RowMap | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(this run's rows, the source's rows) to copy for a per-row table, or None for a
    parameter copied whole. Item tables: the padding row 0, the matched items and the rows
    after the items (the [MASK] row) position for position; attribute tables: matched
    attributes (row = id - 1), or nothing when either side's attribute vocabulary is unknown.

    Raises:
        ConfigError: a table whose rows after the items differ in number (N + 1 + extra).
    """
    if key in ATTRIBUTE_TABLES:
        if attrs is None:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        keep = (attrs.dst <= n_rows) & (attrs.src <= src_rows)
        return torch.from_numpy(attrs.dst[keep] - 1), torch.from_numpy(attrs.src[keep] - 1)
    if key not in ITEM_TABLES:
        return None
    extra = n_rows - (items.n_dst + 1)
    if extra < 0 or src_rows - (items.n_src + 1) != extra:
        raise ConfigError(
            f"train.warm_start: {key} has {src_rows} rows for {items.n_src} items in the "
            f"source, {n_rows} for {items.n_dst} here: not padding + items + the same extra rows"
        )
    tail = np.arange(extra, dtype=np.int64)
    dst = np.concatenate([[0], items.dst, items.n_dst + 1 + tail])
    src = np.concatenate([[0], items.src, items.n_src + 1 + tail])
    return torch.from_numpy(dst), torch.from_numpy(src)


def remap(
    fresh: torch.Tensor, source: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """``fresh`` with its rows ``pairs[0]`` replaced by ``source``'s rows ``pairs[1]``."""
    out = fresh.detach().clone()
    dst, src = pairs
    rows = source.detach()[src.to(source.device)]  # only the copied rows move to the device
    out[dst.to(out.device)] = rows.to(out.device, out.dtype)
    return out


@dataclass
class WarmStart:
    """A source matched to this run: its rows by raw id; ``record()`` is the lineage."""

    source: WarmSource
    items: RowMap
    attrs: RowMap | None

    def record(self, optimizer: bool) -> dict[str, Any]:
        """``results.json``'s, the checkpoint's and the export manifest's ``warm_start``."""
        return {
            "source": self.source.path,
            "source_run": self.source.run,
            "kind": self.source.kind,
            "model": self.source.model,
            "data": self.source.data,
            "items_copied": len(self.items.dst),
            "items_added": self.items.added,
            "items_dropped": self.items.n_src - len(self.items.dst),  # in the source only
            "attributes_copied": None if self.attrs is None else len(self.attrs.dst),
            "optimizer": optimizer,
        }


def plan_warm_start(
    cfg: ExperimentConfig, info: ExamplesInfo, shapes: dict[str, tuple], attr_raw: Any = None
) -> WarmStart:
    """Reads ``train.warm_start``, checks it against this run and matches its rows.

    Args:
        shapes: this run's model's state-dict shapes.
        attr_raw: this run's attribute tokens of ids 1..A (S3Rec), or None to read them from
            ``info``'s dataset version when the model has an attribute table.
    """
    source = read_source(str(cfg.train.warm_start), cfg.storage)
    check_source(source, cfg, info, shapes)
    raw, _ = read_item_vocab(info.prepared_uri, cfg.storage)
    attrs = None
    if any(k in shapes for k in ATTRIBUTE_TABLES) and source.attr_raw is not None:
        uri = f"{info.prepared_uri}/vocab/attributes.parquet"
        if attr_raw is None and exists(uri, cfg.storage):
            attr_raw = read_raw_vocab(uri, cfg.storage)
        attrs = None if attr_raw is None else match_rows(source.attr_raw, attr_raw)
    return WarmStart(source, match_rows(source.item_raw, raw), attrs)


def warm_state_dict(module: torch.nn.Module, warm: WarmStart) -> dict[str, torch.Tensor]:
    """``module``'s state with the source's weights: per-row tables remapped by raw id (new
    rows keep ``module``'s fresh ones), every other tensor the source's."""
    out = {}
    for key, fresh in module.state_dict().items():
        source = warm.source.weights[key]
        pairs = row_pairs(key, fresh.shape[0] if fresh.dim() else 0, source.shape[0] if
                          source.dim() else 0, warm.items, warm.attrs)  # fmt: skip
        if pairs is None:
            out[key] = source.detach().to(fresh.device, fresh.dtype)
        else:
            out[key] = remap(fresh, source, pairs)
    return out


def optimizer_param_names(
    model: torch.nn.Module, weight_decay: float, sparse_items: bool
) -> tuple[list[str], list[str]]:
    """The parameter names in the order ``build.build_optimizer`` hands them to (the dense
    optimizer, the item table's ``SparseAdam``): AdamW's decay group (matrices) first."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sparse = [n for n, _ in named if sparse_items and n == SPARSE_TABLE]
    dense = [(n, p) for n, p in named if n not in sparse]
    if weight_decay != 0:
        dense = sorted(dense, key=lambda np_: np_[1].dim() < 2)  # stable: matrices first
    return [n for n, _ in dense], sparse


def state_by_name(saved: dict[str, Any], dense: list[str], sparse: list[str]) -> dict[str, Any]:
    """An optimizer's saved state (plain, or ``SplitOptimizer``'s ``{"dense", "sparse"}``) per
    parameter name, given the names in the order its optimizers received them."""
    split = set(saved) == {"dense", "sparse"}
    parts = [(saved["dense"], dense), (saved["sparse"], sparse)] if split else [(saved, dense)]
    out = {}
    for part, names in parts:
        ids = [i for group in part["param_groups"] for i in group["params"]]
        if len(ids) != len(names):
            raise ConfigError(
                f"train.warm_start_optimizer: the source's optimizer holds {len(ids)} "
                f"parameters where its model has {len(names)}"
            )
        out |= {name: part["state"][i] for i, name in zip(ids, names) if i in part["state"]}
    return out


def carry_optimizer(
    warm: WarmStart, module: torch.nn.Module, optimizer: Any, weight_decay: float, sparse: bool
) -> None:
    """Loads the source's optimizer state into ``optimizer`` (this run's, built for
    ``module``), per parameter name: per-row moments remapped like the weights (zeros for new
    rows), ``step`` kept. A source trained with the other ``train.sparse_item_updates`` is
    converted: the item table's Adam moments become SparseAdam's and back (same tensors, the
    step as each optimizer keeps it)."""
    saved = warm.source.optimizer or {}
    src_sparse = set(saved) == {"dense", "sparse"}
    by_name = state_by_name(saved, *optimizer_param_names(module, warm.source.weight_decay,
                                                            src_sparse))  # fmt: skip
    params = dict(module.named_parameters())
    dense_names, sparse_names = optimizer_param_names(module, weight_decay, sparse)
    parts = [(optimizer.dense, dense_names), (optimizer.sparse, sparse_names)] if sparse else [
        (optimizer, dense_names)]  # fmt: skip
    for opt, names in parts:
        lazy = isinstance(opt, torch.optim.SparseAdam)
        state = opt.state_dict()
        ids = [i for group in state["param_groups"] for i in group["params"]]
        for i, name in zip(ids, names):
            if name in by_name:
                state["state"][i] = _remap_state(by_name[name], params[name], name, warm, lazy)
        opt.load_state_dict(state)


def _remap_state(
    old: dict[str, Any], param: torch.Tensor, name: str, warm: WarmStart, lazy: bool
) -> dict[str, Any]:
    """One parameter's optimizer state for this run: row tensors of per-row tables remapped,
    ``step`` as the receiving optimizer keeps it (SparseAdam: an int; Adam: a float tensor)."""
    new: dict[str, Any] = {}
    for k, v in old.items():
        if k == "step":
            new[k] = int(v) if lazy else torch.tensor(float(v), dtype=torch.float32)
        elif torch.is_tensor(v) and v.dim() and name in ITEM_TABLES + ATTRIBUTE_TABLES:
            pairs = row_pairs(name, param.shape[0], v.shape[0], warm.items, warm.attrs)
            assert pairs is not None
            new[k] = remap(torch.zeros_like(param), v, pairs)
        else:
            new[k] = v
    return new


def check_same_start(module: torch.nn.Module, world: int) -> str:
    """A digest of ``module``'s parameters, checked equal on every rank (a collective).

    Raises:
        RuntimeError: the ranks start from different weights (naming them).
    """
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()[:16]
    if world > 1 and dist.is_available() and dist.is_initialized():
        every: list[Any] = [None] * world
        dist.all_gather_object(every, digest)
        if len(set(every)) > 1:
            raise RuntimeError(f"warm start: the ranks start from different weights: {every}")
    return digest
