"""The training function every worker runs, the same in all three modes.

    fearec-dist train --config jobs/configs/demo.yaml --debug      # in this process, no workers
    fearec-dist train --config jobs/configs/demo.yaml --local --workers 2   # DDP on this machine
    ray job submit -- python -m fearec_dist train --config …        # on a running cluster

Per epoch: the worker's shard of whole target buckets -> partners -> batches -> ``loss_terms``
(contrastive candidates gathered from every worker with gradient) -> DDP step; then, every
``eval_every`` epochs, full-rank metrics of its share of users, all-reduced; then one
``ray.train.report`` with rank 0's checkpoint. Test metrics are computed whenever validation
improves, so the latest report and ``results.json`` always hold the test score of the best epoch,
even when Tune's ASHA stops the trial early.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from fearec_dist.config import ExperimentConfig
from fearec_dist.data.feed import TrainFeed, eval_batch_from_arrow
from fearec_dist.train import checkpoint as ckpt
from fearec_dist.train.distributed import build_gather
from fearec_dist.train.metrics import MetricAccumulator, mask_history_, ranks_from_scores
from fearec_dist.train.outputs import TensorBoardLog, write_run_outputs


def say(message: str) -> None:
    """One console line. Written to stdout directly: Ray Train's patched ``print`` on workers
    sends each line to the console twice (once through its logger)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def quiet_ray_train_console() -> None:
    """Ray Train logs every report (the whole metrics dict) at INFO on the console; keep that in
    its log files and show warnings only."""
    for handler in logging.getLogger("ray.train").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


@dataclass
class Progress:
    """Early-stopping and bookkeeping state; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    best: float = -math.inf
    best_epoch: int = 0
    bad_evals: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    valid: dict[str, float] = field(default_factory=dict)  # at the best epoch
    test: dict[str, float] = field(default_factory=dict)  # at the best epoch


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> Any:
    """Adam (spec §9); weight decay, when asked for, only on matrices (nanoGPT's grouping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if weight_decay == 0:
        return torch.optim.Adam(params, lr=lr)
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


def autocast_for(device: torch.device, amp: str) -> Any:
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return nullcontext()
    if amp == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}


TEST_KILL_ENV = "FEAREC_DIST_TEST_KILL"


def _test_kill_hook(epoch: int, step: int, rank: int) -> None:
    """Fault-injection for the tests: ``FEAREC_DIST_TEST_KILL=<marker>:<epoch>:<step>:<rank>``
    (0-based) makes that rank's process exit hard at that step once: the marker file is created
    first, and an existing marker disarms the hook (the restarted worker runs on)."""
    spec = os.environ.get(TEST_KILL_ENV)
    if not spec:
        return
    marker, at_epoch, at_step, at_rank = spec.rsplit(":", 3)
    if (epoch, step, rank) != (int(at_epoch), int(at_step), int(at_rank)):
        return
    if os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(f"killed rank {rank} at epoch {epoch} step {step}\n")
    say(f"[fearec-dist] {TEST_KILL_ENV}: rank {rank} exits at epoch {epoch} step {step}")
    os._exit(1)


def train_one_epoch(
    model: torch.nn.Module,
    module: torch.nn.Module,
    loss_terms: Any,
    feed: TrainFeed,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    amp: str,
    gather: Any,
) -> dict[str, float]:
    """One pass over this worker's batches; returns mean loss terms, samples and timings."""
    model.train()
    sums: dict[str, torch.Tensor] = {}
    steps = samples = 0
    start = time.perf_counter()
    for batch_np in feed.epoch(epoch):
        _test_kill_hook(epoch, steps, feed.rank)
        batch = _to_device(batch_np, device)
        with autocast_for(device, amp):
            terms = loss_terms(module, batch, gather=gather, forward=model)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        steps += 1
        samples += len(batch_np["target"])
    seconds = time.perf_counter() - start
    out = {f"train/{k}": float(v) / max(steps, 1) for k, v in sums.items()}
    return out | {
        "train/steps": steps,
        "train/samples": samples,
        "seconds": seconds,
        "data_wait_s": feed.wait_s,
        "padded": feed.padded,
        "skipped": feed.skipped,
    }


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    full_scores: Any,
    batches: Iterable[Any],
    topk: list[int],
    device: torch.device,
    amp: str = "off",
    all_reduce: bool = True,
) -> dict[str, float]:
    """Full-ranking metrics over ``batches`` (pyarrow tables or numpy dicts), both protocols.

    Scores are computed ``eval_batch_size`` rows at a time, so memory is bounded by
    batch × (n_items + 1) floats whatever the catalogue size.
    """
    model.eval()
    acc = MetricAccumulator(topk)
    for raw in batches:
        batch_np = raw if isinstance(raw, dict) else eval_batch_from_arrow(raw)
        if not len(batch_np["target"]):
            continue
        batch = _to_device(batch_np, device)
        with autocast_for(device, amp):
            scores = full_scores(model, batch)
        scores = scores.float()
        scores[:, 0] = float("-inf")  # padding is never a candidate
        target = batch["target"]
        ranks = ranks_from_scores(scores, target)
        if "seen_rows" in batch:
            mask_history_(scores, batch["seen_rows"], batch["seen_items"], target)
        acc.add(ranks, ranks_from_scores(scores, target))
    model.train()
    return acc.result(all_reduce=all_reduce)


def _prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in metrics.items() if k != "n_users"}


def train_func(config: dict[str, Any]) -> None:
    """Ray Train entrypoint. ``config``: ``experiment`` (the config dict), ``examples`` (the
    examples' info.json), ``run_dir`` (URI of this run's output directory)."""
    import ray.train

    from fearec_dist.models import build_model, get_spec

    cfg = ExperimentConfig.from_dict(config["experiment"], "train_loop_config")
    quiet_ray_train_console()
    info, run_dir = config["examples"], config["run_dir"]
    storage = cfg.data.storage
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.train.torch_threads or max(1, math.ceil(cfg.run.cpus_per_worker))
    torch.set_num_threads(threads)
    device = _device(cfg.run.use_gpu)
    torch.manual_seed(cfg.train.seed + rank)
    np.random.seed((cfg.train.seed + rank) % 2**32)

    # [1] model, optimizer, and the state to resume from
    spec = get_spec(cfg.model.name)
    model = build_model(
        cfg.model.name,
        n_items=info["n_items"],
        max_seq_len=info["max_seq_len"],
        **cfg.model.params,
        **model_inputs(spec, cfg, info),
    ).to(device)
    loss_fn = spec.stage_loss(cfg.train.stage)
    if cfg.train.stage == "finetune" and ray.train.get_checkpoint() is None:
        start_from_pretrained(spec, model, cfg)
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    progress, best_state = Progress(), None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            state = ckpt.load_state(d, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        progress = Progress(**state["progress"])
        best_state = state.get("best_model")
        ckpt.set_rng_state(state["rng"])
        if rank == 0:
            say(f"[fearec-dist] resumed from epoch {progress.epoch} ({restored.path})")
    if world > 1:
        # No buffer broadcast: FEARec's band masks are constant buffers, and eval runs unwrapped.
        model = ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"broadcast_buffers": False}
        )
    module = getattr(model, "module", model)
    gather = build_gather(cfg.train.gather_negatives)

    # [2] data: this worker's shards
    global_batch = cfg.train.batch_size * world
    steps = max(1, info["n_train"] // global_batch)
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    feed = TrainFeed(
        ray.train.get_dataset_shard("train"),
        batch_size=cfg.train.batch_size,
        steps=steps,
        seed=cfg.train.seed,
        rank=rank,
        window=cfg.train.shuffle_window,
        needs_partner=spec.needs_partner(module.config),
    )
    valid_shard = ray.train.get_dataset_shard("valid")
    test_shard = ray.train.get_dataset_shard("test")
    if rank == 0 and progress.epoch == 0:
        contrast = getattr(getattr(module, "config", None), "contrast", "none")
        negatives = 2 * (global_batch if gather is not None else cfg.train.batch_size)
        nce = f"InfoNCE candidates/row {negatives - 1} | " if contrast != "none" else ""
        say(
            f"[fearec-dist] {cfg.model.name}: {sum(p.numel() for p in module.parameters()):,} "
            f"params | {world} worker(s) x batch {cfg.train.batch_size} = global batch "
            f"{global_batch} | {steps} steps/epoch | {nce}device {device} | "
            f"torch threads {threads} | run dir {run_dir}"
        )

    def eval_split(shard: Any) -> dict[str, float]:
        batches = shard.iter_batches(batch_size=cfg.train.eval_batch_size, batch_format="pyarrow")
        return evaluate(module, spec.full_scores, batches, cfg.train.topk, device, cfg.train.amp)

    tensorboard = TensorBoardLog(run_dir, storage) if rank == 0 else None

    # [3] epochs
    for epoch in range(progress.epoch, cfg.train.epochs):
        stats = train_one_epoch(
            model, module, loss_fn, feed, epoch, optimizer, device, cfg.train.amp, gather
        )
        row: dict[str, Any] = {"epoch": epoch + 1}
        row |= {k: v for k, v in stats.items() if k.startswith("train/")}
        row["train_seconds"] = round(stats["seconds"], 2)
        row["samples_per_s"] = round(stats["train/samples"] * world / stats["seconds"], 1)
        row["data_wait_share"] = round(stats["data_wait_s"] / max(stats["seconds"], 1e-9), 4)
        row["padded"], row["skipped"] = stats["padded"], stats["skipped"]
        due = (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs
        if due and cfg.train.stage != "pretrain":  # pretraining has no next-item head to rank
            valid = eval_split(valid_shard)
            row |= _prefixed(valid, "valid")
            value = valid[cfg.train.valid_metric]
            if value > progress.best:  # strict, as the official FEARec repo (spec §9)
                progress.best, progress.best_epoch, progress.bad_evals = value, epoch + 1, 0
                progress.valid = _prefixed(valid, "valid")
                progress.test = _prefixed(eval_split(test_shard), "test")
                best_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            else:
                progress.bad_evals += 1
                progress.stopped_early = progress.bad_evals > cfg.train.patience
        row |= progress.test
        row["best_epoch"] = progress.best_epoch
        progress.epoch = epoch + 1
        progress.history = [r for r in progress.history if r["epoch"] <= epoch] + [row]
        if rank == 0:
            _print_epoch(row, cfg.train.valid_metric, cfg.train.epochs)
        _report(row, progress, module, optimizer, best_state, cfg, info, run_dir, rank, storage)
        if tensorboard is not None:
            tensorboard.log(row)
        if progress.stopped_early:
            if rank == 0:
                say(f"[fearec-dist] early stop after {cfg.train.patience + 1} evals without gain")
            break
    if tensorboard is not None:
        tensorboard.close()


def model_inputs(spec: Any, cfg: ExperimentConfig, info: dict[str, Any]) -> dict[str, Any]:
    """Non-config constructor inputs: the item-attribute table for models that need one."""
    if not spec.needs_attributes:
        return {}
    from fearec_dist.data.attributes import read_attribute_table

    table = read_attribute_table(info["prepared_uri"], cfg.data.storage, info["n_items"])
    if table is None:
        raise ValueError(
            f"model {cfg.model.name!r} needs item attributes, but the prepared dataset "
            f"{info['prepared_uri']} has none: prepare it with --attributes (RecBole .item file "
            "or item2attributes.json), or set data.attributes"
        )
    return {"item_attributes": table}


def start_from_pretrained(spec: Any, model: torch.nn.Module, cfg: ExperimentConfig) -> None:
    """S3Rec finetune: load the pretrained encoder, or say clearly that there is none."""
    if cfg.train.pretrained:
        source = ckpt.latest_checkpoint(cfg.train.pretrained, cfg.data.storage)
        state = ckpt.load_state_uri(source, cfg.data.storage)
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


def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def results_dict(progress: Progress, cfg_dict: dict[str, Any], info: dict[str, Any]) -> dict:
    return {
        "valid": {k.removeprefix("valid/"): v for k, v in progress.valid.items()},
        "test": {k.removeprefix("test/"): v for k, v in progress.test.items()},
        "best_epoch": progress.best_epoch,
        "epochs_run": progress.epoch,
        "stopped_early": progress.stopped_early,
        "seconds_training": round(sum(r.get("train_seconds", 0.0) for r in progress.history), 1),
        "data": {k: info[k] for k in ("uri", "fingerprint", "n_train", "n_valid", "n_test")},
        "config": cfg_dict,
    }


def _report(
    row: dict[str, Any],
    progress: Progress,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    best_state: dict[str, torch.Tensor] | None,
    cfg: ExperimentConfig,
    info: dict[str, Any],
    run_dir: str,
    rank: int,
    storage: Any,
) -> None:
    """Rank 0 writes the outputs and a checkpoint; every rank calls report (it is a barrier)."""
    import ray.train

    metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
    if rank != 0:
        ray.train.report(metrics)
        return
    cfg_dict = cfg.to_dict()
    write_run_outputs(run_dir, progress.history, results_dict(progress, cfg_dict, info), storage)
    state = {
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "progress": copy.deepcopy(asdict(progress)),
        "best_model": best_state,
        "rng": ckpt.rng_state(),
        "config": cfg_dict,
        "data": {k: v for k, v in info.items() if k != "buckets"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.save_state(tmp, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _print_epoch(row: dict[str, Any], metric: str, epochs: int) -> None:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row.get('train/loss', math.nan):.4f}"]
    for key in (f"valid/{metric}", "valid/ndcg@10", "valid/masked_ndcg@10", "test/hr@10"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    parts.append(f"{row['samples_per_s']:.0f} samples/s, data wait {row['data_wait_share']:.1%}")
    say("[fearec-dist] " + " | ".join(parts))
