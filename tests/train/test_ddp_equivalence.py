"""One optimiser step of FEARec on a global batch split over 2 real gloo ranks (DDP, contrastive
candidates gathered with gradient) equals one process on the whole batch; without the gather the
updated parameters differ (the negative pool shrinks to the local batch)."""

from __future__ import annotations

import pytest
import torch

from fearec_dist.models import build_model, get_spec
from fearec_dist.train.distributed import build_gather
from tests.conftest import run_gloo_ranks

N_ITEMS, L, B = 40, 12, 8
MODEL = "fearec_official"
OVERRIDES = {
    "hidden_dropout": 0.0,
    "attn_dropout": 0.0,
    "per_sample_delays_in_training": True,  # delays must not depend on the batch split
    "hidden_size": 16,
    "inner_size": 32,
}


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(1, L + 1, (2 * B,), generator=g)
    seq = torch.randint(1, N_ITEMS + 1, (2 * B, L), generator=g)
    seq[torch.arange(L)[None, :] >= lens[:, None]] = 0
    perm = torch.randperm(2 * B, generator=g)
    return {
        "item_seq": seq,
        "seq_len": lens,
        "target": torch.randint(1, N_ITEMS + 1, (2 * B,), generator=g),
        "pos_seq": seq[perm],
        "pos_len": lens[perm],
    }


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(MODEL, n_items=N_ITEMS, max_seq_len=L, **OVERRIDES)


def _step(model, batch, gather) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    # the trainer's call: the bare module for attributes, the DDP wrapper for the forward
    module = getattr(model, "module", model)
    terms = get_spec(MODEL).loss_terms(module, batch, gather=gather, forward=model)
    opt.zero_grad()
    terms["loss"].backward()
    opt.step()
    return float(terms["loss"].detach())


def _worker(rank: int, world: int, use_gather: bool, out) -> None:
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(_model(), broadcast_buffers=False)
    batch = {k: v[rank * B : (rank + 1) * B] for k, v in _batch().items()}
    loss = _step(model, batch, build_gather(use_gather))
    params = {k: v.detach().numpy().copy() for k, v in model.module.state_dict().items()}
    out.put((rank, loss, params))


def _run_two(use_gather: bool):
    return run_gloo_ranks(_worker, (use_gather,))


def test_two_ranks_with_gathered_negatives_equal_one_process():
    single = _model()
    loss = _step(single, _batch(), None)
    results = _run_two(use_gather=True)
    assert (results[0][1] + results[1][1]) / 2 == pytest.approx(loss, abs=1e-5)
    for _, _, params in results:
        for key, value in single.state_dict().items():
            torch.testing.assert_close(torch.from_numpy(params[key]), value, atol=1e-5, rtol=1e-5)

    local_only = _run_two(use_gather=False)
    params = local_only[0][2]
    diff = max(
        float((torch.from_numpy(params[k]) - v).abs().max()) for k, v in single.state_dict().items()
    )
    assert diff > 1e-4
