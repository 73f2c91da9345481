"""``train.amp: fp16`` trains with a loss scaler (float16 gradients underflow without one), and
its state travels in the checkpoint so a resumed run continues with the same scale."""

from __future__ import annotations

import numpy as np
import torch

from fearec_dist.config import load_config
from fearec_dist.data.examples import ExamplesInfo
from fearec_dist.data.pairing import MemoryFeed
from fearec_dist.data.sequences import build_loo_examples
from fearec_dist.models import get_spec
from fearec_dist.train.build import build_train_state
from fearec_dist.train.loop import StepContext, train_one_epoch

CPU = torch.device("cpu")
N_ITEMS, L = 30, 8


def _setup(amp: str):
    cfg = load_config(None, ["model.name=sasrec", f"train.amp={amp}", "model.hidden_size=16",
                             "model.inner_size=32", f"data.max_seq_len={L}"])  # fmt: skip
    info = ExamplesInfo(uri="", prepared_uri="", max_seq_len=L, n_items=N_ITEMS, n_users=40)
    torch.manual_seed(0)
    spec = get_spec("sasrec")
    state = build_train_state(spec, cfg, info, CPU, fresh=True)
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 12, size=40)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = rng.integers(1, N_ITEMS + 1, size=offsets[-1]).astype(np.int32)
    train = build_loo_examples(offsets, items, np.arange(1, 41), L, splits=("train",))["train"]
    feed = MemoryFeed(train, batch_size=16, seed=1, pair=False, steps=3)
    run = StepContext(state.module, state.module, spec.loss_terms, state.optimizer, feed, CPU,
                      amp=amp, scaler=state.scaler)  # fmt: skip
    return state, run


def _set_scale(scaler: torch.amp.GradScaler, scale: float) -> None:
    scaler.load_state_dict(scaler.state_dict() | {"scale": scale})


def test_fp16_trains_with_a_scaler_whose_state_is_checkpointed():
    state, run = _setup("fp16")
    assert state.scaler is not None and state.scaler.get_scale() == 2.0**16
    stats = train_one_epoch(run, 0)
    assert stats["train/steps"] == 3 and np.isfinite(stats["train/loss"])
    saved = state.to_state([], {}, ExamplesInfo("", "", L, N_ITEMS, 40))
    assert saved["scaler"]["scale"] == state.scaler.get_scale()
    fresh, _ = _setup("fp16")
    _set_scale(fresh.scaler, 1.0)  # a different scale before the restore
    fresh.restore(saved | {"rng": []}, rank=0)
    assert fresh.scaler.state_dict() == state.scaler.state_dict()


def test_a_step_whose_scaled_gradient_overflows_is_skipped_and_the_scale_backs_off():
    state, run = _setup("fp16")
    _set_scale(state.scaler, 2.0**60)  # 2^60 x the loss overflows float16 in the backward pass
    before = {k: v.clone() for k, v in state.module.state_dict().items()}
    run.feed.steps = 1
    train_one_epoch(run, 0)
    after = state.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the step was skipped
    assert state.scaler.get_scale() == 2.0**59


def test_bf16_and_float32_need_no_scaler():
    for amp in ("bf16", "'off'", "auto"):
        state, _ = _setup(amp)
        assert state.scaler is None
        assert state.to_state([], {}, ExamplesInfo("", "", L, N_ITEMS, 40))["scaler"] is None
