"""Collectives the trainer needs: the gather-with-gradient behind cross-worker negatives, and the
DDP wrapper (``wrap_ddp``) whose forward syncs gradients.

The contrastive loss follows open_clip's "local loss + gather with grad": each worker scores its own
rows against every worker's candidates, gathered with gradient, and DDP's gradient average then
equals the whole-batch gradient (checked in tests/train/test_distributed.py with 2 gloo ranks).
A plain ``dist.all_gather`` with the local slice put back gives a gradient wrong in direction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


try:
    # Private module (torch 2.13): all_gather_single_autograd carries autograd, no warning.
    from torch.distributed._functional_collectives import all_gather_single_autograd, wait_tensor

    USE_FUNCTIONAL = True
except ImportError:  # the private API moved: fall back to the public (deprecated) one
    USE_FUNCTIONAL = False


def _all_gather_equal(x: torch.Tensor) -> list[torch.Tensor]:
    """All-gathers same-shape tensors with autograd; one entry per rank."""
    if USE_FUNCTIONAL:
        out = wait_tensor(all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD))
        return list(out.chunk(dist.get_world_size(), dim=0))
    from torch.distributed.nn.functional import all_gather

    return list(all_gather(x.contiguous()))


def all_gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenates every rank's ``x`` (rank order) with gradient flowing back to each rank.

    Rows may differ between ranks: sizes are exchanged first and the tensors padded to the largest.

    Args:
        x: (n_w, D) this rank's rows.

    Returns:
        (all rows (N, D), offset of this rank's rows in them).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    rank = dist.get_rank()
    n_local = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n_local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n_local)
    counts = [int(s) for s in sizes]
    longest = max(counts)
    if longest != x.shape[0]:
        pad = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    parts = _all_gather_equal(x)
    rows = torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)
    return rows, sum(counts[:rank])


def build_gather(enabled: bool) -> Gather | None:
    """The gather hook handed to ``loss_terms``: None when off or without a process group."""
    if not enabled or not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_world_size() == 1:
        return None
    return all_gather_with_grad


def wrap_ddp(module: torch.nn.Module, world: int) -> torch.nn.Module:
    """Ray Train's DDP wrapper around ``module`` for ``world > 1`` (else ``module`` itself).

    No buffer broadcast: FEARec's band masks are constant buffers, and evaluation runs on the
    bare module (ranks may score unequal batch counts, which a DDP forward would not survive).
    """
    if world == 1:
        return module
    import ray.train.torch

    kwargs = {"broadcast_buffers": False}
    return ray.train.torch.prepare_model(module, parallel_strategy_kwargs=kwargs)
