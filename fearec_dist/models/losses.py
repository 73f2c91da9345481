"""Loss functions shared by the models: full-softmax CE and the cross-worker InfoNCE.

Shapes: B local batch, N rows over all workers, D hidden, V = n_items + 1.

``gather`` is the trainer's hook (``fearec_dist.train.distributed.all_gather_with_grad``): given
this worker's (B, D) rows it returns every worker's rows (N, D) in rank order, with gradient, and
the offset of this worker's rows. ``None`` means one process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all V classes (padding column included, spec fearec.md §4)."""
    return F.cross_entropy(logits.float(), target)


def info_nce(
    a: torch.Tensor, b: torch.Tensor, tau: float, sim: str, gather: Gather | None = None
) -> torch.Tensor:
    """The 2N-way InfoNCE of spec fearec.md §5.2, for this worker's rows.

    Rows are the local [a; b] (2B), columns the gathered [A; B] (2N). Each row's own column is
    excluded, its label is its partner (row i of a <-> row i of b); every other row — same target
    or same user included — is a negative, as in the reference. With ``gather=None`` this is
    exactly ``mean_r [logsumexp_{c != r} S_rc - S_r,pos(r)]`` over the 2B rows.

    Args:
        a: (B, D) first view.
        b: (B, D) second view.
        tau: temperature.
        sim: "dot" or "cos".
        gather: cross-worker gather, or None.

    Returns:
        scalar mean over the 2B local rows.
    """
    a, b = a.float(), b.float()
    if sim == "cos":
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    elif sim != "dot":
        raise ValueError(f"sim must be 'dot' or 'cos', got {sim!r}")
    if gather is None:
        all_a, all_b, offset = a, b, 0
    else:
        all_a, offset = gather(a)
        all_b, _ = gather(b)
    n_local, n_all = a.shape[0], all_a.shape[0]
    rows = torch.cat([a, b])  # (2B, D)
    cols = torch.cat([all_a, all_b])  # (2N, D)
    logits = rows @ cols.T / tau  # (2B, 2N)
    local = torch.arange(n_local, device=a.device) + offset
    own = torch.cat([local, local + n_all])
    labels = torch.cat([local + n_all, local])
    logits = logits.index_put(
        (torch.arange(2 * n_local, device=a.device), own),
        torch.tensor(float("-inf"), device=a.device),
    )
    return F.cross_entropy(logits, labels)


def freq_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spec fearec.md §5.4: mean |rfft(a) - rfft(b)| over the hidden axis, norm='ortho'."""
    fa = torch.fft.rfft(a.float(), dim=-1, norm="ortho")
    fb = torch.fft.rfft(b.float(), dim=-1, norm="ortho")
    return (fa - fb).abs().mean()
