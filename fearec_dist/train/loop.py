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

from fearec_dist.config import ExperimentConfig, TrainSection
from fearec_dist.data.feed import TrainFeed
from fearec_dist.train import checkpoint as ckpt
from fearec_dist.train.console import (
    StepProgress,
    head_line,
    print_epoch,
    print_start,
    quiet_ray_train_console,
    say,
)
from fearec_dist.train.device import autocast_for, device_for, to_device
from fearec_dist.train.distributed import average_sparse_grad, build_gather, wrap_ddp
from fearec_dist.train.evaluate import evaluate
from fearec_dist.train.faults import kill_if_asked
from fearec_dist.train.progress import epoch_row, prefixed
from fearec_dist.train.report import Reporter
from fearec_dist.train.stages import build_softmax


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
    partial: dict[str, Any] | None = None,
    on_step: Any = None,
    softmax: Any = None,
    sparse_table: torch.nn.Parameter | None = None,
) -> dict[str, float]:
    """One pass over this worker's batches; returns mean loss terms, samples and timings.

    ``model`` is the DDP wrapper (its forward syncs gradients), ``module`` the bare model the
    loss reads its attributes from; without DDP both are the same module. ``partial`` resumes
    the epoch mid-way (its ``steps`` done, loss ``sums``, ``samples``, ``seconds``): the feed
    replays those batches without training on them. ``on_step(partial)`` runs after every step
    but the last (step checkpoints). ``softmax`` (a ``SampledSoftmax``, or None for the full
    softmax) draws each step's shared negatives from (seed, epoch, step), so a resumed epoch
    draws the same ones; ``sparse_table`` is the item table whose row-sparse gradient is
    averaged over the ranks before the step (``train.sparse_item_updates``).
    """
    model.train()
    partial = partial or {}
    sums: dict[str, torch.Tensor] = dict(partial.get("sums", {}))
    steps, samples = partial.get("steps", 0), partial.get("samples", 0)
    start = time.perf_counter() - partial.get("seconds", 0.0)
    first_step = last_step = math.nan  # wall clock of this call's first and last step
    for batch_np in feed.epoch(epoch, skip=steps):
        if feed.head and feed.rank == 0 and math.isnan(first_step):
            say(head_line(feed.head, epoch))
        kill_if_asked(epoch, steps, feed.rank)
        batch = to_device(batch_np, device)
        candidates = softmax.at_step(epoch, steps) if softmax is not None else None
        with autocast_for(device, amp):
            terms = loss_terms(module, batch, gather=gather, forward=model, softmax=candidates)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if sparse_table is not None:
            average_sparse_grad(sparse_table)
        optimizer.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        steps += 1
        samples += len(batch_np["target"])
        last_step = time.time()
        first_step = last_step if math.isnan(first_step) else first_step
        if on_step is not None and steps < feed.steps:
            seconds = time.perf_counter() - start
            on_step({"steps": steps, "sums": sums, "samples": samples, "seconds": seconds})
    seconds = time.perf_counter() - start
    out = {f"train/{k}": float(v) / max(steps, 1) for k, v in sums.items()}
    return out | {
        "train/steps": steps,
        "train/samples": samples,
        "seconds": seconds,
        "data_wait_s": feed.wait_s,
        "plan_wait_s": feed.plan_wait_s,
        "first_wait_s": feed.first_wait_s,
        "first_step_unix": first_step,
        "last_step_unix": last_step,
        "padded": feed.padded,
        "skipped": feed.skipped,
        "plan_seconds": feed.plan_seconds,
        **feed.head,  # head_rows, head_users, head_self_paired: the first epoch's head, if any
    }


def setup_worker(cfg: ExperimentConfig, rank: int) -> tuple[torch.device, int]:
    """Console, torch threads, device and this rank's seeds; returns (device, threads)."""
    quiet_ray_train_console()
    threads = cfg.train.torch_threads or max(1, math.ceil(cfg.run.cpus_per_worker))
    torch.set_num_threads(threads)
    ckpt.seed_rank(cfg.train.seed, rank)
    return device_for(cfg.run.use_gpu), threads


def build_feed(cfg: ExperimentConfig, info: dict[str, Any], planner: Any) -> TrainFeed:
    """This worker's stream of each epoch's examples (from the run's ``EpochPlanner``): a fixed
    number of steps per epoch on every rank."""
    import ray.train

    from fearec_dist.data.epochs import head_fraction

    ctx, t = ray.train.get_context(), cfg.train
    per_rank = info["n_train"] // ctx.get_world_size()
    # a first epoch in two parts (head, rest) gives each rank at most one row less
    per_rank -= 1 if head_fraction(t.first_epoch_head, info["n_train"]) else 0
    steps = max(1, per_rank // t.batch_size)
    return TrainFeed(
        planner,
        rank=ctx.get_world_rank(),
        batch_size=t.batch_size,
        steps=min(steps, t.max_steps_per_epoch) if t.max_steps_per_epoch else steps,
        seed=t.seed,
        shuffle_buffer=t.shuffle_window,
        prefetch_blocks=t.prefetch_blocks,
    )


def evaluate_epoch(
    row: dict[str, Any], state: ckpt.TrainState, score: Any, t: TrainSection
) -> None:
    """Validation metrics into ``row``; on a new best, the test metrics and the weights too.

    ``score(split)`` returns the metrics of this worker's shard of ``split``, all-reduced.
    """
    valid = score("valid")
    row |= prefixed(valid, "valid")
    if state.progress.record_valid(row["epoch"], valid, t.valid_metric, t.patience):
        state.progress.test = prefixed(score("test"), "test")
        state.keep_best()


def valid_on(t: TrainSection, info: dict[str, Any]) -> str:
    """Which users validation scores, for the epoch line."""
    n = min(t.valid_users, info["n_users"]) if t.valid_users else 0
    return f"a fixed sample of {n:,} users" if n else "all users"


def train_func(config: dict[str, Any]) -> None:
    """Ray Train entrypoint. ``config``: ``experiment`` (the config dict), ``examples`` (the
    examples' info.json), ``run_dir`` (URI of this run's output directory), ``planner`` (the
    run's ``EpochPlanner`` actor), ``eval`` (``{"valid"|"test": [one dataset per rank]}``)."""
    import ray.train

    from fearec_dist.models import get_spec

    cfg = ExperimentConfig.from_dict(config["experiment"], "train_loop_config")
    info, run_dir, t = config["examples"], config["run_dir"], cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device, threads = setup_worker(cfg, rank)

    # [1] build the model (a fresh finetune from the pretrained encoder) and its optimizer
    spec, restored = get_spec(cfg.model.name), ray.train.get_checkpoint()
    state = ckpt.build_train_state(spec, cfg, info, device, fresh=restored is None)
    loss_fn, gather = spec.stage_loss(t.stage), build_gather(t.gather_negatives)
    softmax = build_softmax(cfg, info, device)  # None: the full softmax

    # [2] restore: weights, optimizer, progress and this rank's own RNG states
    if restored is not None:
        state.restore_from(restored, rank, device)
    model = wrap_ddp(state.module, world, t.sparse_item_updates)  # syncs gradients
    table = state.module.item_embedding.weight if t.sparse_item_updates else None

    # [3] shards: the training feed, and the evaluation rows scored on the bare module
    feed = build_feed(cfg, info, config["planner"])

    def score(split: str) -> dict[str, float]:
        rows = config["eval"][split][rank].iter_batches(
            batch_size=t.eval_batch_size, batch_format="pyarrow"
        )
        return evaluate(
            state.module, spec, rows, t.topk, device, t.amp, item_chunk=t.eval_item_chunk
        )

    if rank == 0 and state.progress.epoch == 0:
        print_start(cfg, state.module, world, feed.steps, gather is not None, device, threads,
                    run_dir)  # fmt: skip

    # [4] epochs: train (a step checkpoint every run.checkpoint_every_steps), evaluate when
    # due; [5] report every epoch (rank 0 checkpoints)
    reporter, every = Reporter(cfg, info, run_dir, rank, world), cfg.run.checkpoint_every_steps

    progress: StepProgress | None = None

    def on_step(partial: dict[str, Any]) -> None:
        if progress is not None:
            progress.tick(partial)
        if every and partial["steps"] % every == 0:
            reporter.report_step(state, partial)

    for epoch in range(state.progress.epoch, t.epochs):
        partial, state.progress.partial = state.progress.partial, {}
        if rank == 0 and cfg.run.progress_every_s:
            progress = StepProgress(
                epoch + 1, t.epochs, feed.steps, cfg.run.progress_every_s, world
            )
        stats = train_one_epoch(
            model, state.module, loss_fn, feed, epoch, state.optimizer, device, t.amp, gather,
            partial, on_step, softmax, table,
        )  # fmt: skip
        row = epoch_row(epoch + 1, stats, world)
        if partial:  # this epoch resumed from a step checkpoint: say where, in metrics.csv
            row["resumed_at_step"] = partial["steps"]
        due = (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs
        if due and t.evaluate and t.stage != "pretrain":  # pretraining ranks nothing
            evaluate_epoch(row, state, score, t)
        state.progress.finish_epoch(row)
        if rank == 0:
            print_epoch(row, t.valid_metric, t.epochs, valid_on(t, info))
        reporter.report(row, state)
        if state.progress.stopped_early:
            if rank == 0:
                say(f"[fearec-dist] early stop after {t.patience + 1} evals without gain")
            break
    reporter.close()
