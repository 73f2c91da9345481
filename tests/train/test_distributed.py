"""Gather with gradient across 2 real gloo processes: the local-loss + gathered-candidates gradient,
averaged over ranks, equals the single-process gradient of the whole batch (both code branches)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fearec_dist.train import distributed
from tests.conftest import run_gloo_ranks


def _contrastive(local: torch.Tensor, gathered: torch.Tensor, offset: int) -> torch.Tensor:
    """Each local row's own gathered column is its positive (a minimal InfoNCE)."""
    logits = local @ gathered.T
    labels = torch.arange(local.shape[0]) + offset
    return torch.nn.functional.cross_entropy(logits, labels)


def _worker(rank: int, world: int, use_functional: bool, sizes: list[int], out) -> None:
    distributed.USE_FUNCTIONAL = use_functional
    torch.manual_seed(0)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(sum(sizes), 6, dtype=torch.float64)
    start = sum(sizes[:rank])
    local = x[start : start + sizes[rank]] @ w
    gathered, offset = distributed.all_gather_with_grad(local)
    assert offset == start
    # weight n_w * W / N makes the DDP average equal the whole-batch mean (unequal shards)
    loss = _contrastive(local, gathered, offset) * sizes[rank] * world / sum(sizes)
    loss.backward()
    grad = w.grad.clone()
    dist.all_reduce(grad)
    out.put((rank, (grad / world).tolist()))


@pytest.mark.parametrize("use_functional", [True, False])
@pytest.mark.parametrize("sizes", [[3, 3], [2, 5]])
def test_gathered_local_loss_equals_single_process(use_functional, sizes):
    results = dict(run_gloo_ranks(_worker, (use_functional, sizes)))

    torch.manual_seed(0)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(sum(sizes), 6, dtype=torch.float64)
    z = x @ w
    _contrastive(z, z, 0).backward()
    for rank in range(2):
        assert torch.allclose(torch.tensor(results[rank], dtype=torch.float64), w.grad, atol=1e-12)


def test_without_process_group_gather_is_identity():
    x = torch.randn(3, 2)
    rows, offset = distributed.all_gather_with_grad(x)
    assert rows is x and offset == 0
    assert distributed.build_gather(True) is None
