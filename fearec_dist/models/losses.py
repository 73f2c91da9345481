"""Loss functions shared by the models: full-softmax CE and the cross-worker InfoNCE.

Shapes: n local rows (this worker's batch), N rows over all workers, D hidden, V = n_items + 1.

``gather`` is the trainer's hook (``fearec_dist.train.distributed.all_gather_with_grad``): given
this worker's (n, D) rows it returns every worker's rows (N, D) in rank order, with gradient
flowing back into each worker's part, and the offset of this worker's rows. ``None`` means one
process, i.e. ``(x, 0)``. Collectives must run in the same order on every rank, so a view is
gathered once per step (`Candidates` remembers it) and only when a contrastive term needs it.

Every loss here is a mean over the local rows. Every worker's batch has the same size (the feed
gives each rank the same number of rows per step), so DDP's average of the W workers' gradients
is the gradient of the whole batch's mean loss; no rescaling is needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fearec_dist.models.layers import at_least_float32

Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all V classes (padding column included, spec fearec.md §4).

    Args:
        logits: (n, V); target: (n,) item ids.
    """
    return F.cross_entropy(at_least_float32(logits), target)


def prepare_view(x: torch.Tensor, sim: str) -> torch.Tensor:
    """(n, D) -> (n, D) rows (>= float32) whose dot products are the similarity (unit for cos)."""
    if sim == "cos":
        return F.normalize(at_least_float32(x), dim=-1)
    if sim != "dot":
        raise ValueError(f"sim must be 'dot' or 'cos', got {sim!r}")
    return at_least_float32(x)


def info_nce_rows(
    a: torch.Tensor,
    b: torch.Tensor,
    all_a: torch.Tensor,
    all_b: torch.Tensor,
    offset: int,
    tau: float,
) -> torch.Tensor:
    """The 2N-way InfoNCE of spec fearec.md §5.2 for this worker's rows, on prepared views.

    Rows are the local [a; b] (2n), columns the gathered [A; B] (2N). A row's own column is
    excluded (-inf), its label is its partner (row i of a <-> row i of b, in gathered
    coordinates ``offset + i`` and ``N + offset + i``); every other column, same target or same
    user included, is a negative, as in the reference (§10.11).

    Args:
        a, b: (n, D) local views, already through `prepare_view`.
        all_a, all_b: (N, D) every worker's a and b rows; ``a``/``b`` at rows offset..offset+n.
        offset: first row of this worker in the gathered tensors.
        tau: temperature.

    Returns:
        scalar, mean over the 2n local rows.
    """
    n, n_all = a.shape[0], all_a.shape[0]
    rows = torch.cat([a, b])  # (2n, D)
    cols = torch.cat([all_a, all_b])  # (2N, D)
    logits = rows @ cols.T / tau  # (2n, 2N)
    local = torch.arange(n, device=a.device) + offset
    own = torch.cat([local, local + n_all])  # (2n,)
    labels = torch.cat([local + n_all, local])  # (2n,) the partner column
    logits = logits.index_put(
        (torch.arange(2 * n, device=a.device), own), logits.new_tensor(float("-inf"))
    )
    return F.cross_entropy(logits, labels)


class Candidates:
    """Prepared views and their gathered counterparts, each gathered at most once per step.

    Example::

        cands = Candidates({"u2": u2, "pos": u_pos}, sim="dot", gather=gather)
        loss = cands.info_nce("u2", "pos", tau=1.0)
    """

    def __init__(self, views: dict[str, torch.Tensor], sim: str, gather: Gather | None) -> None:
        self.views = {name: prepare_view(x, sim) for name, x in views.items()}
        self.gather = gather
        self.gathered: dict[str, tuple[torch.Tensor, int]] = {}

    def all_rows(self, name: str) -> tuple[torch.Tensor, int]:
        if name not in self.gathered:
            x = self.views[name]
            self.gathered[name] = (x, 0) if self.gather is None else self.gather(x)
        return self.gathered[name]

    def info_nce(self, a: str, b: str, tau: float) -> torch.Tensor:
        all_a, offset = self.all_rows(a)
        all_b, _ = self.all_rows(b)
        return info_nce_rows(self.views[a], self.views[b], all_a, all_b, offset, tau)


def info_nce(
    a: torch.Tensor, b: torch.Tensor, tau: float, sim: str, gather: Gather | None = None
) -> torch.Tensor:
    """Spec fearec.md §5.2 ``info_nce(a, b, τ, N, sim)``; gathers a, then b, when ``gather``.

    With ``gather=None`` this is ``mean_r [logsumexp_{c != r} S_rc - S_r,pos(r)]`` over the 2n
    rows of [a; b], S = z zᵀ / τ (dot) or cos(z_r, z_c) / τ (cos).

    Args:
        a, b: (n, D) the two views, row i of a paired with row i of b.
        tau: temperature.
        sim: "dot" or "cos".
        gather: cross-worker gather, or None.
    """
    return Candidates({"a": a, "b": b}, sim, gather).info_nce("a", "b", tau)


def freq_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """D(a, b) of spec fearec.md §5.4: mean |rfft(a) - rfft(b)| over the hidden axis, 'ortho'.

    Args:
        a, b: (n, D). Returns the mean over the n·(D//2+1) complex moduli.
    """
    fa = torch.fft.rfft(at_least_float32(a), dim=-1, norm="ortho")  # (n, D//2+1)
    fb = torch.fft.rfft(at_least_float32(b), dim=-1, norm="ortho")
    return (fa - fb).abs().mean()
