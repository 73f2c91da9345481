"""The training function every worker runs, the same in all three modes.

    fearec-dist train --config jobs/configs/demo.yaml --debug      # in this process, no workers
    fearec-dist train --config jobs/configs/demo.yaml --local --workers 2   # DDP on this machine
    ray job submit -- python -m fearec_dist train --config …        # on a running cluster

Owns ``train_func`` (the short story: build the model -> restore -> shards -> epochs -> report),
``train_one_epoch`` (the per-step loss: ``spec.loss_terms`` with candidates gathered from every
worker with gradient, then the DDP step) and ``build_optimizer``. The rooms it calls: the
training feed (``data/feed.py``), evaluation scoring (``evaluate.py``), checkpoint state
(``checkpoint.py``), S3Rec's stages (``stages.py``), the epoch report (``report.py``).

Test metrics are computed whenever validation improves, so the latest report and
``results.json`` always hold the test score of the best epoch, even when Tune's ASHA stops the
trial early.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from fearec_dist.config import ExperimentConfig
from fearec_dist.data.feed import TrainFeed
from fearec_dist.train import checkpoint as ckpt
from fearec_dist.train.console import print_epoch, print_start, quiet_ray_train_console, say
from fearec_dist.train.device import autocast_for, device_for, to_device
from fearec_dist.train.distributed import build_gather
from fearec_dist.train.evaluate import evaluate
from fearec_dist.train.faults import kill_if_asked
from fearec_dist.train.progress import Progress, epoch_row, prefixed
from fearec_dist.train.report import Reporter
from fearec_dist.train.stages import build_run_model, start_from_pretrained


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
    """One pass over this worker's batches; returns mean loss terms, samples and timings.

    ``model`` is the DDP wrapper (its forward syncs gradients), ``module`` the bare model the
    loss reads its attributes from; without DDP both are the same module.
    """
    model.train()
    sums: dict[str, torch.Tensor] = {}
    steps = samples = 0
    start = time.perf_counter()
    for batch_np in feed.epoch(epoch):
        kill_if_asked(epoch, steps, feed.rank)
        batch = to_device(batch_np, device)
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


def train_func(config: dict[str, Any]) -> None:
    """Ray Train entrypoint. ``config``: ``experiment`` (the config dict), ``examples`` (the
    examples' info.json), ``run_dir`` (URI of this run's output directory)."""
    import ray.train

    from fearec_dist.models import get_spec

    cfg = ExperimentConfig.from_dict(config["experiment"], "train_loop_config")
    info, run_dir, t = config["examples"], config["run_dir"], cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    quiet_ray_train_console()
    threads = t.torch_threads or max(1, math.ceil(cfg.run.cpus_per_worker))
    torch.set_num_threads(threads)
    device = device_for(cfg.run.use_gpu)
    ckpt.seed_rank(t.seed, rank)

    # [1] the model (a finetune starts from the pretrained encoder) and its optimizer
    spec = get_spec(cfg.model.name)
    module = build_run_model(spec, cfg, info).to(device)
    restored = ray.train.get_checkpoint()
    if t.stage == "finetune" and restored is None:
        start_from_pretrained(spec, module, cfg)
    state = ckpt.TrainState(module, build_optimizer(module, t.lr, t.weight_decay), Progress())
    loss_fn = spec.stage_loss(t.stage)

    # [2] restore: weights, optimizer, progress and this rank's RNG states
    if restored is not None:
        with restored.as_directory() as d:
            state.restore(ckpt.load_state(d, map_location=device), rank)
        if rank == 0:
            say(f"[fearec-dist] resumed from epoch {state.progress.epoch} ({restored.path})")
    model = module
    if world > 1:  # no buffer broadcast: FEARec's band masks are constants, eval runs unwrapped
        kwargs = {"broadcast_buffers": False}
        model = ray.train.torch.prepare_model(module, parallel_strategy_kwargs=kwargs)
    gather = build_gather(t.gather_negatives)

    # [3] shards: this worker's training feed and evaluation rows
    steps = max(1, info["n_train"] // (t.batch_size * world))
    steps = min(steps, t.max_steps_per_epoch) if t.max_steps_per_epoch else steps
    feed = TrainFeed(
        ray.train.get_dataset_shard("train"),
        batch_size=t.batch_size,
        steps=steps,
        seed=t.seed,
        rank=rank,
        window=t.shuffle_window,
        needs_partner=spec.needs_partner(module.config),
    )
    shards = {s: ray.train.get_dataset_shard(s) for s in ("valid", "test")}

    def eval_split(split: str) -> dict[str, float]:
        rows = shards[split].iter_batches(batch_size=t.eval_batch_size, batch_format="pyarrow")
        return evaluate(module, spec.full_scores, rows, t.topk, device, t.amp)

    if rank == 0 and state.progress.epoch == 0:
        contrast = getattr(module.config, "contrast", "none") != "none"
        negatives = 2 * t.batch_size * (world if gather is not None else 1) if contrast else None
        n_params = sum(p.numel() for p in module.parameters())
        print_start(cfg.model.name, n_params, world, t.batch_size, steps, negatives, device,
                    threads, run_dir)  # fmt: skip

    # [4] epochs: train, evaluate when due, [5] report every epoch (rank 0 checkpoints)
    reporter, progress = Reporter(cfg, info, run_dir, rank, world), state.progress
    for epoch in range(progress.epoch, t.epochs):
        stats = train_one_epoch(model, module, loss_fn, feed, epoch, state.optimizer, device,
                                t.amp, gather)  # fmt: skip
        row = epoch_row(epoch + 1, stats, world)
        due = (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs
        if due and t.stage != "pretrain":  # pretraining has no next-item head to rank
            valid = eval_split("valid")
            row |= prefixed(valid, "valid")
            if progress.record_valid(epoch + 1, valid, t.valid_metric, t.patience):
                progress.test = prefixed(eval_split("test"), "test")
                state.keep_best()
        progress.finish_epoch(row)
        if rank == 0:
            print_epoch(row, t.valid_metric, t.epochs)
        reporter.report(row, state)
        if progress.stopped_early:
            if rank == 0:
                say(f"[fearec-dist] early stop after {t.patience + 1} evals without gain")
            break
    reporter.close()
