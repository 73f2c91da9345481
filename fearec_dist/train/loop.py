"""The training function every worker runs, the same in all three modes.

    fearec-dist train --config jobs/configs/demo.yaml --debug      # in this process, no workers
    fearec-dist train --config jobs/configs/demo.yaml --local --workers 2   # DDP on this machine
    ray job submit -- python -m fearec_dist train --config …        # on a running cluster

Owns ``train_func`` (the short story: build -> restore -> feed -> evaluation rows -> epochs),
``build_step_context`` (everything a step uses, built once per worker), ``train_one_epoch`` (the
per-step loss: ``spec.loss_terms`` with candidates gathered from every worker with gradient,
then the DDP step) and ``run_epoch`` (train, evaluate when due, report). The rooms it calls:
building the model, optimizer and softmax (``build.py``), the training feed (``data/feed.py``),
evaluation scoring (``evaluate.py``), checkpoint state (``checkpoint.py``), the epoch report
(``report.py``).

Test metrics are computed whenever validation improves, so the latest report and
``results.json`` always hold the test score of the best epoch, even when Tune's ASHA stops the
trial early.

Importable without Ray (a GPU machine without Ray runs ``train_one_epoch`` on an in-memory feed):
Ray is imported inside the functions that talk to Ray Train.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fearec_dist.config import ExperimentConfig, TrainSection
from fearec_dist.data.examples import ExamplesInfo, read_warm_items
from fearec_dist.data.feed import TrainFeed
from fearec_dist.models import get_spec
from fearec_dist.models.softmax import SampledSoftmax
from fearec_dist.models.spec import ModelSpec
from fearec_dist.train import checkpoint as ckpt
from fearec_dist.train.build import build_softmax, build_train_state
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
from fearec_dist.train.warm_start import check_same_start

Score = Callable[[str], dict[str, float]]  # split -> metrics of this worker's shard, all-reduced


@dataclass
class StepContext:
    """What every training step of one worker uses, built once per run.

    ``model`` is the DDP wrapper (its forward syncs gradients), ``module`` the bare model the
    loss reads its attributes from; without DDP both are the same module. ``softmax`` (a
    ``SampledSoftmax``, or None for the full softmax) draws each step's shared negatives from
    (seed, epoch, step), so a resumed epoch draws the same ones; ``sparse_table`` is the item
    table whose row-sparse gradient is averaged over the ranks before the step
    (``train.sparse_item_updates``). ``feed``: a ``TrainFeed``, or any object with its
    ``epoch(e, skip)``, ``steps``, ``rank`` and ``stats`` (``data/pairing.py``'s in-memory one).
    """

    model: torch.nn.Module
    module: torch.nn.Module
    loss_terms: Callable[..., dict[str, torch.Tensor]]
    optimizer: Any
    feed: Any
    device: torch.device
    amp: str = "off"
    gather: Any = None
    softmax: SampledSoftmax | None = None
    sparse_table: torch.nn.Parameter | None = None
    scaler: torch.amp.GradScaler | None = None  # fp16: the loss is scaled, steps with inf skipped


def train_one_epoch(
    run: StepContext,
    epoch: int,
    partial: dict[str, Any] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, float]:
    """One pass over this worker's batches; returns mean loss terms, samples and timings.

    ``partial`` resumes the epoch mid-way (its ``steps`` done, loss ``sums``, ``samples``,
    ``seconds``): the feed replays those batches without training on them. ``on_step(partial)``
    runs after every step but the last (step checkpoints, the progress line).
    """
    run.model.train()
    partial, feed = partial or {}, run.feed
    sums: dict[str, torch.Tensor] = dict(partial.get("sums", {}))
    steps, samples = partial.get("steps", 0), partial.get("samples", 0)
    start = time.perf_counter() - partial.get("seconds", 0.0)
    first_step = last_step = math.nan  # wall clock of this call's first and last step
    for batch_np in feed.epoch(epoch, skip=steps):
        if feed.stats.head and feed.rank == 0 and math.isnan(first_step):
            say(head_line(feed.stats.head, epoch))
        kill_if_asked(epoch, steps, feed.rank)
        batch = to_device(batch_np, run.device)
        candidates = run.softmax.at_step(epoch, steps) if run.softmax is not None else None
        with autocast_for(run.device, run.amp):
            terms = run.loss_terms(
                run.module, batch, gather=run.gather, forward=run.model, softmax=candidates
            )
        run.optimizer.zero_grad(set_to_none=True)
        if run.scaler is None:
            terms["loss"].backward()
        else:  # scaled gradients: averaging them over ranks commutes with the unscale
            run.scaler.scale(terms["loss"]).backward()
        if run.sparse_table is not None:
            average_sparse_grad(run.sparse_table)
        if run.scaler is None:
            run.optimizer.step()
        else:  # unscales, skips the step if a gradient is inf/NaN, then adapts the scale
            run.scaler.step(run.optimizer)
            run.scaler.update()
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
    out: dict[str, Any] = {f"train/{k}": float(v) / max(steps, 1) for k, v in sums.items()}
    out |= {"train/steps": steps, "train/samples": samples, "seconds": seconds}
    out |= {"first_step_unix": first_step, "last_step_unix": last_step}
    return out | feed.stats.to_row()  # waits, skipped rows, plan time, the head's counts


def setup_worker(cfg: ExperimentConfig, rank: int) -> tuple[torch.device, int]:
    """Console, torch threads, device and this rank's seeds; returns (device, threads)."""
    quiet_ray_train_console()
    threads = cfg.train.torch_threads or max(1, math.ceil(cfg.run.cpus_per_worker))
    torch.set_num_threads(threads)
    ckpt.seed_rank(cfg.train.seed, rank)
    return device_for(cfg.run.use_gpu), threads


def build_feed(cfg: ExperimentConfig, planner: Any, rank: int) -> TrainFeed:
    """This worker's stream of each epoch's examples from the run's ``EpochPlanner``: the same
    number of steps every epoch on every rank, from the rows the planner gives each rank."""
    import ray  # here: see the module docstring

    t = cfg.train
    steps = max(1, ray.get(planner.rows_per_rank.remote()) // t.batch_size)
    return TrainFeed(
        planner,
        rank=rank,
        batch_size=t.batch_size,
        steps=min(steps, t.max_steps_per_epoch) if t.max_steps_per_epoch else steps,
        seed=t.seed,
        shuffle_buffer=t.shuffle_window,
        prefetch_blocks=t.prefetch_blocks,
    )


def build_step_context(
    cfg: ExperimentConfig,
    spec: ModelSpec,
    info: ExamplesInfo,
    planner: Any,
    rank: int,
    device: torch.device,
) -> tuple[ckpt.TrainState, StepContext]:
    """[1] the model (a fresh finetune from the pretrained encoder), its optimizer and softmax;
    [2] a restore of weights, optimizer, progress and this rank's RNG states when Ray Train
    hands a checkpoint; the DDP wrapper; [3] this worker's training feed."""
    import ray.train  # here: see the module docstring

    t, world = cfg.train, ray.train.get_context().get_world_size()
    restored = ray.train.get_checkpoint()
    state = build_train_state(spec, cfg, info, device, fresh=restored is None)
    softmax = build_softmax(cfg, info, device)  # None: the full softmax
    if restored is not None:
        state.restore_from(restored, rank, device)
    model = wrap_ddp(state.module, world, t.sparse_item_updates)  # syncs gradients
    if restored is None and state.warm_start is not None:  # every rank from rank 0's weights
        state.warm_start["start_digest"] = check_same_start(state.module, world)
        state.warm_start["ranks_checked"] = world
        if rank == 0:
            say(warm_start_line(state.warm_start))
    return state, StepContext(
        model=model,
        module=state.module,
        loss_terms=spec.stage_loss(t.stage),
        optimizer=state.optimizer,
        feed=build_feed(cfg, planner, rank),
        device=device,
        amp=t.amp,
        gather=build_gather(t.gather_negatives),
        softmax=softmax,
        sparse_table=state.module.item_embedding.weight if t.sparse_item_updates else None,
        scaler=state.scaler,
    )


def warm_start_line(record: dict[str, Any]) -> str:
    """The console's line for ``train.warm_start`` (its lineage record)."""
    data = record["data"]
    optimizer = "carried" if record["optimizer"] else "fresh"
    return (
        f"[fearec-dist] warm start from {record['source']} ({record['kind']}, dataset version "
        f"{data.get('version')}): {record['items_copied']:,} item rows copied by raw id, "
        f"{record['items_added']:,} new items initialised afresh; optimizer state {optimizer}; "
        f"every rank starts from weights {record['start_digest']}"
    )


def build_scorer(
    t: TrainSection,
    spec: ModelSpec,
    run: StepContext,
    shards: dict[str, list[Any]],
    rank: int,
    warm: Any = None,
) -> Score:
    """``score(split)``: this rank's rows of ``split`` scored on the bare module, all-reduced;
    in float32, the encoder under ``train.amp`` only when ``train.eval_amp`` asks. ``warm``:
    the temporal protocol's items seen before the cut (``read_warm_items``), or None."""
    encoder_amp = t.amp if t.eval_amp else "off"

    def score(split: str) -> dict[str, float]:
        rows = shards[split][rank].iter_batches(
            batch_size=t.eval_batch_size, batch_format="pyarrow"
        )
        return evaluate(run.module, spec, rows, t.topk, run.device, encoder_amp,
                        item_chunk=t.eval_item_chunk, warm=warm)  # fmt: skip

    return score


def evaluate_epoch(
    row: dict[str, Any], state: ckpt.TrainState, score: Score, t: TrainSection
) -> None:
    """Validation metrics into ``row``; on a new best, the test metrics and the weights too."""
    valid = score("valid")
    row |= prefixed(valid, "valid")
    if state.progress.record_valid(row["epoch"], valid, t.valid_metric, t.patience):
        state.progress.test = prefixed(score("test"), "test")
        state.keep_best()


def valid_on(t: TrainSection, info: ExamplesInfo) -> str:
    """Which users validation scores, for the epoch line."""
    n = min(t.valid_users, info.n_users) if t.valid_users else 0
    return f"a fixed sample of {n:,} users" if n else "all users"


@dataclass
class WorkerRun:
    """One worker's run: its config, data, rank, state, step context, scorer and reporter."""

    cfg: ExperimentConfig
    info: ExamplesInfo
    rank: int
    world: int
    state: ckpt.TrainState
    steps: StepContext
    score: Score
    reporter: Reporter


def run_epoch(w: WorkerRun, epoch: int) -> None:
    """Trains ``epoch`` (a step checkpoint every ``run.checkpoint_every_steps``, rank 0's
    progress line every ``run.progress_every_s``), evaluates when due and reports (rank 0
    checkpoints)."""
    cfg, t, progress = w.cfg, w.cfg.train, w.state.progress
    partial, progress.partial = progress.partial, {}
    line = None
    if w.rank == 0 and cfg.run.progress_every_s:
        line = StepProgress(epoch + 1, t.epochs, w.steps.feed.steps, cfg.run.progress_every_s,
                            w.world)  # fmt: skip
    every = cfg.run.checkpoint_every_steps

    def on_step(done: dict[str, Any]) -> None:
        if line is not None:
            line.tick(done)
        if every and done["steps"] % every == 0:
            w.reporter.report_step(w.state, done)

    row = epoch_row(epoch + 1, train_one_epoch(w.steps, epoch, partial, on_step), w.world)
    if partial:  # this epoch resumed from a step checkpoint: say where, in metrics.csv
        row["resumed_at_step"] = partial["steps"]
    due = (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs
    if due and t.evaluate and t.stage != "pretrain":  # pretraining ranks nothing
        evaluate_epoch(row, w.state, w.score, t)
    progress.finish_epoch(row)
    if w.rank == 0:
        print_epoch(row, t.valid_metric, t.epochs, valid_on(t, w.info))
    w.reporter.report(row, w.state)


def train_func(config: dict[str, Any]) -> None:
    """Ray Train entrypoint. ``config``: ``experiment`` (the config dict), ``examples`` (the
    examples' info.json), ``run_dir`` (URI of this run's output directory), ``planner`` (the
    run's ``EpochPlanner`` actor), ``eval`` (``{"valid"|"test": [one dataset per rank]}``)."""
    import ray.train  # here: see the module docstring

    cfg = ExperimentConfig.from_dict(config["experiment"], "train_loop_config")
    info, t, run_dir = ExamplesInfo.from_dict(config["examples"]), cfg.train, config["run_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device, threads = setup_worker(cfg, rank)

    # [1]-[3] model, optimizer, softmax; restore; DDP; the training feed
    spec = get_spec(cfg.model.name)
    state, steps = build_step_context(cfg, spec, info, config["planner"], rank, device)
    # [4] the evaluation rows, scored on the bare module
    warm = read_warm_items(info, cfg.storage)  # temporal: the candidates; loo: None
    score = build_scorer(t, spec, steps, config["eval"], rank, warm)
    if rank == 0 and state.progress.epoch == 0:
        print_start(cfg, state.module, world, steps.feed.steps, steps.gather is not None,
                    device, threads, run_dir)  # fmt: skip
        if info.train_since is not None:  # nothing dropped silently: the count is said
            say(f"[fearec-dist] data.train_since: {info.n_train:,} training examples kept, "
                f"{info.train_before_since:,} removed (targets before it)")  # fmt: skip

    # [5] epochs: train, evaluate when due, report every epoch
    reporter = Reporter(cfg, info, run_dir, rank, world)
    run = WorkerRun(cfg, info, rank, world, state, steps, score, reporter)
    for epoch in range(state.progress.epoch, t.epochs):
        run_epoch(run, epoch)
        if state.progress.stopped_early:
            if rank == 0:
                say(f"[fearec-dist] early stop after {t.patience + 1} evals without gain")
            break
    reporter.close()
