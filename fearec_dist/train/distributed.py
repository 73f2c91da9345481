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


def _row_counts(x: torch.Tensor) -> list[int]:
    """Every rank's ``x.shape[0]``, in rank order."""
    n_local = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n_local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n_local)
    return [int(s) for s in sizes]


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
    rank, counts = dist.get_rank(), _row_counts(x)
    longest = max(counts)
    if longest != x.shape[0]:
        pad = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    parts = _all_gather_equal(x)
    rows = torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)
    return rows, sum(counts[:rank])


def _world() -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def _all_gather_ragged(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``x`` (first dimensions may differ; no gradient), in rank order."""
    counts = _row_counts(x)
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return [p[:c] for p, c in zip(parts, counts)]


def all_gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """(n_w,) ids of every rank concatenated in rank order (the sampled softmax's in-batch
    candidates: ids only, each rank looks them up in its own replica of the item table)."""
    if _world() == 1:
        return ids
    return torch.cat(_all_gather_ragged(ids))


def build_gather_ids(enabled: bool) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The in-batch candidates' id gather: None when off or in one process."""
    return all_gather_ids if enabled and _world() > 1 else None


SPARSE_TABLE = "item_embedding.weight"  # the parameter sparse item updates apply to


def average_sparse_grad(param: torch.nn.Parameter) -> None:
    """In place: ``param.grad`` (row-sparse) becomes the mean of every rank's, like DDP's average.

    Only the touched rows travel: each rank's coalesced (row ids, rows) are all-gathered and
    summed (rows touched on several ranks add up), then divided by the world size. Works on gloo
    and NCCL (all_gather only; NCCL has no sparse all-reduce).
    """
    world = _world()
    if world == 1 or param.grad is None:
        return
    grad = param.grad.coalesce()
    rows = _all_gather_ragged(grad.indices()[0])
    values = _all_gather_ragged(grad.values())
    total = torch.sparse_coo_tensor(
        torch.cat(rows)[None, :], torch.cat(values) / world, grad.shape
    ).coalesce()
    param.grad = total


def keep_table_out_of_ddp(module: torch.nn.Module) -> None:
    """Before DDP wraps ``module``: rank 0's item table to every rank (what DDP's start-up
    broadcast would do) and the table on DDP's ignore list (``average_sparse_grad`` syncs it)."""
    table = dict(module.named_parameters())[SPARSE_TABLE]
    dist.broadcast(table.data, src=0)
    DDP = torch.nn.parallel.DistributedDataParallel
    DDP._set_params_and_buffers_to_ignore_for_model(module, [SPARSE_TABLE])


def build_gather(enabled: bool) -> Gather | None:
    """The gather hook handed to ``loss_terms``: None when off or without a process group."""
    if not enabled or not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_world_size() == 1:
        return None
    return all_gather_with_grad


def wrap_ddp(module: torch.nn.Module, world: int, sparse_items: bool = False) -> torch.nn.Module:
    """Ray Train's DDP wrapper around ``module`` for ``world > 1`` (else ``module`` itself).

    No buffer broadcast: FEARec's band masks are constant buffers, and evaluation runs on the
    bare module (ranks may score unequal batch counts, which a DDP forward would not survive).
    With ``sparse_items`` the item table is left out of DDP (its row-sparse gradient goes through
    ``average_sparse_grad``): rank 0's table is broadcast here, as DDP does for the rest.
    """
    if world == 1:
        return module
    import ray.train.torch

    if sparse_items:
        keep_table_out_of_ddp(module)
    kwargs = {"broadcast_buffers": False}
    return ray.train.torch.prepare_model(module, parallel_strategy_kwargs=kwargs)
