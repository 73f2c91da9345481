"""The end of every epoch (and every ``run.checkpoint_every_steps`` steps): outputs, a
checkpoint and ``ray.train.report``, from every rank.

Owns ``Reporter``: rank 0 rewrites the run outputs (``results.json``, ``metrics.csv``,
``curves.png``, TensorBoard) and writes the checkpoint into a fresh temporary directory that
``ray.train.report`` persists (Ray's single-writer pattern); every rank calls ``report`` (it is
a barrier) after handing its RNG states to rank 0.
"""

from __future__ import annotations

import tempfile
from typing import Any

from fearec_dist.config import ExperimentConfig
from fearec_dist.data.examples import ExamplesInfo
from fearec_dist.tracking import RunTracking
from fearec_dist.train import checkpoint as ckpt
from fearec_dist.train.outputs import TensorBoardLog, write_run_outputs
from fearec_dist.train.progress import results_dict


class Reporter:
    """Reports each epoch of one worker; built once per run, closed at the end."""

    def __init__(
        self, cfg: ExperimentConfig, info: ExamplesInfo, run_dir: str, rank: int, world: int
    ) -> None:
        self.cfg_dict, self.info, self.run_dir = cfg.to_dict(), info, run_dir
        self.tune_metric = cfg.tune.metric
        self.rank, self.world, self.storage = rank, world, cfg.storage
        self.tensorboard = TensorBoardLog(run_dir, cfg.storage) if rank == 0 else None
        # rank 0's MLflow run (run.tracking_uri): never waits long, never fails the run
        tracked = rank == 0 and cfg.run.tracking_uri
        self.tracking = RunTracking(cfg, run_dir) if tracked else None
        self.last: tuple[list, dict] | None = None  # the last history and results written

    def report(self, row: dict[str, Any], state: ckpt.TrainState) -> None:
        """Reports ``row`` (its numeric values) with rank 0's checkpoint of ``state``."""
        import ray.train

        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        rng = ckpt.gather_rng_states(self.rank, self.world)  # a collective: every rank
        if self.rank != 0:
            ray.train.report(metrics)
            return
        results = results_dict(state.progress, self.cfg_dict, self.info)
        results["warm_start"] = state.warm_start  # lineage: the start's source (None: cold)
        if self.tracking is not None:  # before ray.train.report: ASHA may stop the trial then
            self.tracking.log_epoch(row, results)
            results["tracking"] = self.tracking.info()  # a resumed run logs to the same run
        write_run_outputs(self.run_dir, state.progress.history, results, self.storage)
        self.last = (state.progress.history, results)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt.save_state(tmp, state.to_state(rng, self.cfg_dict, self.info))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if self.tensorboard is not None:
            self.tensorboard.log(row)
        if self.tracking is not None:
            self.tracking.log_outputs()

    def report_step(self, state: ckpt.TrainState, partial: dict[str, Any]) -> None:
        """A step checkpoint inside an epoch: no ``metrics.csv`` row; the result repeats the
        last epoch's values (``epoch`` = epochs completed, so ASHA's ``time_attr`` does not
        move) and carries ``step_in_epoch``; every result Tune sees has the metric it reads."""
        import math

        import ray.train

        progress = state.progress
        progress.partial = {
            **partial,
            "sums": {k: v.detach().float().cpu() for k, v in partial["sums"].items()},
        }
        last = progress.history[-1] if progress.history else {}
        metrics = {k: v for k, v in last.items() if isinstance(v, (int, float))}
        metrics.setdefault(self.tune_metric, math.nan)
        metrics |= {"epoch": progress.epoch, "step_in_epoch": partial["steps"]}
        rng = ckpt.gather_rng_states(self.rank, self.world)  # a collective: every rank
        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            ckpt.save_state(tmp, state.to_state(rng, self.cfg_dict, self.info))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.tracking is not None:
            history, results = self.last or ([], {})
            self.tracking.end("FINISHED", {"stopped_early": results.get("stopped_early", False)})
            if results and results["tracking"] != self.tracking.info():  # it opened late
                results["tracking"] = self.tracking.info()
                write_run_outputs(self.run_dir, history, results, self.storage)
