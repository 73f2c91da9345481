"""The ``train:`` section: optimisation, evaluation, the feed's buffers and the softmax."""

from __future__ import annotations

import os
from dataclasses import dataclass

from fearec_dist.config.keys import option
from fearec_dist.errors import ConfigError


@dataclass
class TrainSection:
    """How each worker trains and evaluates: batch sizes are per worker (the global batch is
    batch_size x run.workers), metrics are full-ranking."""

    epochs: int = option(20, "epochs to train (at most; patience may stop earlier)")
    batch_size: int = option(256, "examples per step per worker (the global batch: x run.workers)")
    eval_batch_size: int = option(512, "rows scored at a time per worker in evaluation")
    lr: float = option(1e-3, "learning rate (Adam; AdamW when weight_decay > 0)")
    weight_decay: float = option(0.0, "AdamW weight decay, on matrices only; 0 = plain Adam")
    eval_every: int = option(1, "validate every N epochs")
    patience: int = option(
        40, "evaluations without improvement before stopping (RecBole: stopping_step)"
    )
    valid_metric: str = option(
        "hr@10", "what picks the best epoch: hr@K | ndcg@K | mrr@K [masked_]"
    )
    topk: list[int] = option([5, 10, 20], "the K of every reported metric (valid_metric's K added)")
    seed: int = option(2026, "seed of the model's initialisation, shuffles and samples")
    gather_negatives: bool = option(
        True, "contrastive candidates from all workers (gathered with gradient)"
    )
    shuffle_window: int = option(
        65536, "examples in each worker's shuffle buffer (bounds its memory; >= batch_size)"
    )
    prefetch_blocks: int = option(4, "blocks of the epoch stream each worker fetches ahead")
    first_epoch_head: int = option(
        65536,
        "epoch 1 starts on a seeded head of N examples (only when training set >= 8 N); 0 = off",
    )
    valid_users: int = option(0, "validate each epoch on a fixed seeded sample of N users; 0 = all")
    evaluate: bool = option(True, "false: no validation or test at all (production retrains)")
    torch_threads: int = option(0, "torch threads per worker; 0 = run.cpus_per_worker rounded up")
    amp: str = option(
        "auto", "auto | off | bf16 | fp16 (auto = bf16 on CUDA when supported; fp16 loss-scaled)"
    )
    eval_amp: bool = option(
        False, "evaluation's encoder under train.amp's autocast (scores stay float32)"
    )
    max_steps_per_epoch: int = option(
        0, "cap on steps per epoch, for smoke tests and benchmarks; 0 = the whole epoch"
    )
    stage: str = option("train", "S3Rec: pretrain | finetune; other models: train")
    pretrained: str | None = option(None, "checkpoint URI to start from (S3Rec finetune)")
    allow_scratch: bool = option(False, "finetune without a pretrained checkpoint (only if asked)")
    softmax: str = option(
        "full", "next-item softmax: full (the reference) | sampled (shared candidates)"
    )
    n_negatives: int = option(
        1024, "sampled: items drawn per step from negative_sampler, shared by ranks"
    )
    negative_sampler: str = option(
        "uniform", "sampled: uniform | popularity (training-target count ** negative_alpha)"
    )
    negative_alpha: float = option(1.0, "sampled: the popularity sampler's exponent")
    in_batch_negatives: bool = option(
        True, "sampled: the global batch's targets are candidates too"
    )
    logq_correction: bool = option(True, "sampled: logit - log(expected count as a candidate)")
    softmax_temperature: float = option(1.0, "sampled: logits / T")
    sparse_item_updates: bool = option(
        False, "row-sparse item-table gradients + lazy (sparse) Adam (needs softmax: sampled)"
    )
    eval_item_chunk: int = option(
        65536, "items scored at a time in evaluation (memory: batch x chunk)"
    )
    warm_start: str | None = option(
        None,
        "start from a run dir (its newest checkpoint), a checkpoint or an export (weights only), "
        "trained on an older version of this dataset: item rows matched by raw id",
    )
    warm_start_optimizer: bool = option(
        False, "warm_start: carry the optimizer state too (a run or checkpoint only)"
    )

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "eval_batch_size", "eval_every", "prefetch_blocks"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if self.shuffle_window < self.batch_size:
            raise ConfigError(
                f"train.shuffle_window: the shuffle buffer ({self.shuffle_window} examples) must "
                f"hold at least one batch ({self.batch_size}); 0 (a worker's whole shard) is "
                "gone since the feed streams: use e.g. 65536"
            )
        if self.first_epoch_head < 0:
            raise ConfigError(f"train.first_epoch_head: must be >= 0, got {self.first_epoch_head}")
        if self.valid_users < 0:
            raise ConfigError(f"train.valid_users: must be >= 0, got {self.valid_users}")
        if not self.lr > 0:  # `not >` also refuses NaN
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"train.weight_decay: must be >= 0, got {self.weight_decay}")
        for key in ("torch_threads", "max_steps_per_epoch"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")
        if not self.topk or min(self.topk) < 1:
            raise ConfigError(f"train.topk: every K must be >= 1, got {self.topk}")
        if self.patience < 0:
            raise ConfigError(f"train.patience: must be >= 0, got {self.patience}")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise ConfigError(f"train.amp: {self.amp!r} is not one of auto, off, bf16, fp16")
        self.check_softmax()
        if self.stage not in ("train", "pretrain", "finetune"):
            raise ConfigError(f"train.stage: {self.stage!r} is not train, pretrain or finetune")
        base = self.valid_metric.removeprefix("masked_")
        name, _, k = base.partition("@")
        if name not in ("hr", "ndcg", "mrr") or not k.isdigit():
            raise ConfigError(
                f"train.valid_metric: {self.valid_metric!r} is not of the form "
                "hr@K / ndcg@K / mrr@K (optionally masked_)"
            )
        if int(k) not in self.topk:
            self.topk = sorted({*self.topk, int(k)})
        self.check_warm_start()

    def check_warm_start(self) -> None:
        if self.warm_start is not None and not str(self.warm_start).strip():
            raise ConfigError("train.warm_start: empty; name a run, checkpoint or export, or null")
        if self.warm_start and "://" not in self.warm_start.replace("file://", ""):
            # absolute here, in the driver: the workers read it from another working directory
            self.warm_start = os.path.abspath(self.warm_start.removeprefix("file://"))
        if self.warm_start_optimizer and not self.warm_start:
            raise ConfigError(
                "train.warm_start_optimizer: true needs train.warm_start (the run or checkpoint "
                "whose optimizer state to carry)"
            )

    def check_softmax(self) -> None:
        if self.softmax not in ("full", "sampled"):
            raise ConfigError(f"train.softmax: {self.softmax!r} is not one of full, sampled")
        if self.negative_sampler not in ("uniform", "popularity"):
            raise ConfigError(
                f"train.negative_sampler: {self.negative_sampler!r} is not one of uniform, "
                "popularity"
            )
        if self.n_negatives < 1:
            raise ConfigError(f"train.n_negatives: must be >= 1, got {self.n_negatives}")
        if not self.negative_alpha >= 0:
            raise ConfigError(
                f"train.negative_alpha: must be >= 0 (0 = uniform over items with a training "
                f"count), got {self.negative_alpha}: a negative exponent favours the rarest items "
                "and overflows to NaN"
            )
        if not self.softmax_temperature > 0:
            raise ConfigError(
                f"train.softmax_temperature: must be > 0, got {self.softmax_temperature}"
            )
        if self.eval_item_chunk < 1:
            raise ConfigError(f"train.eval_item_chunk: must be >= 1, got {self.eval_item_chunk}")
        if self.sparse_item_updates and self.stage == "pretrain":
            raise ConfigError(
                "train.sparse_item_updates: not for train.stage: pretrain (S3Rec's pretraining "
                "objectives score the whole table)"
            )
        if self.sparse_item_updates and self.weight_decay > 0:
            raise ConfigError(
                "train.sparse_item_updates with train.weight_decay > 0: the item table's lazy "
                "SparseAdam has no weight decay, so the table would silently lose the decay it "
                "gets in a dense run; set train.weight_decay: 0 or train.sparse_item_updates: false"
            )
        if self.sparse_item_updates and self.softmax != "sampled":
            raise ConfigError(
                "train.sparse_item_updates: needs train.softmax: sampled (the full softmax "
                "touches every item row, so its gradient is dense)"
            )
