"""The next-item softmax of every model: full (the reference) or sampled, with logQ correction.

Shapes: n rows scored on this worker (B, or B·K masked slots for BERT4Rec), N rows over all
workers, M candidates, D hidden, V = n_items + 1 table rows (0 = padding, never a candidate).

``train.softmax: full`` is each model's reference cross-entropy over all V columns. With
``sampled``, a row's logits are its target against M shared candidates (Jean et al. 2015;
Yi et al. 2019 for the in-batch correction):

- the targets of the **global** batch (``train.in_batch_negatives``): their ids are gathered from
  every worker, and each worker looks their embeddings up in its own copy of the item table. The
  table is replicated, so the gradient of a worker's rows reaches the same table rows it would in
  one process, and the ranks' average (DDP, or the sparse exchange) is the whole batch's gradient:
  no gather with gradient is needed for ids (``tests/models/test_softmax.py`` checks it with
  2 gloo ranks). Off ``train.gather_negatives`` (or in one process) only the local targets;
- ``train.n_negatives`` K items drawn with replacement from ``train.negative_sampler``
  (``uniform`` over 1..n_items, or ``popularity`` ∝ count^``train.negative_alpha``, counted over
  the training targets only: the examples' ``item_counts.parquet``), from a generator seeded by
  (``train.seed``, epoch, step): every rank draws the same K ids, and a resumed run the same ones;
- ``train.logq_correction``: each candidate's logit minus log E[count of the item among the
  candidates] = log(N·p_train(c) + K·q(c)) (in-batch targets appear ∝ their training frequency,
  p_train(c) = count(c) / T over the T training targets, ``in_batch_probability``; the sampler
  draws q). The positive is not corrected: it is always there, not drawn.
  **An approximation for BERT4Rec:** its in-batch candidates are the labels of masked slots,
  drawn from every position of a sequence (its first item included), not next-item targets, so
  they do not follow the next-item counts p_train assumes; the correction is then only close
  to right (nearly so for long sequences, where the two distributions are alike), and items
  never seen as a next-item target get the floor count 1.
  With accidental hits masked, E[Σ_c exp(s_c) / E[n_c]] = Σ_{j != target} exp(s_j), so
  exp(s_target) + that sum estimates the full softmax's normaliser without the popularity bias
  of the candidates (importance sampling, Bengio & Senécal 2008);
- accidental hits: a candidate equal to the row's target is masked (-inf); the target counts
  once, as the positive (column 0);
- logits are (q·e + b) / ``train.softmax_temperature``, b the model's output bias (BERT4Rec).

The loss is the mean (or, with ``reduction="none"``, the per-row) CE with label 0 over
[positive | candidates]. With all V rows as candidates, no in-batch part and no correction it is
exactly the full CE (tested). Candidates are looked up with ``F.embedding``, so an item table built
with ``sparse=True`` (``train.sparse_item_updates``) gets a row-sparse gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fearec_dist.models.layers import at_least_float32
from fearec_dist.models.losses import ce_loss

GatherIds = Callable[[torch.Tensor], torch.Tensor]


def sampled_ce(
    seq_repr: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    candidates: torch.Tensor,
    log_q: torch.Tensor | None = None,
    temperature: float = 1.0,
    sparse: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """CE of each row's target against shared ``candidates``, accidental hits masked.

    Args:
        seq_repr: (n, D) sequence representations.
        target: (n,) item ids.
        weight: (R, D) the item table (R >= V; ids index it directly); bias: (R,) or None.
        candidates: (M,) item ids, duplicates allowed.
        log_q: (M,) log expected count of each candidate's id among the candidates, or None
            (no correction).
        temperature: logits are divided by it (before the correction).
        sparse: look rows up with a sparse gradient.
        reduction: "mean" over rows, or "none" for (n,).

    Returns:
        scalar, or (n,) per-row losses.
    """
    pos_e = F.embedding(target, weight, sparse=sparse)  # (n, D)
    cand_e = F.embedding(candidates, weight, sparse=sparse)  # (M, D)
    pos = (seq_repr * pos_e).sum(-1)  # (n,)
    cand = seq_repr @ cand_e.T  # (n, M)
    if bias is not None:
        pos, cand = pos + bias[target], cand + bias[candidates]
    pos, cand = at_least_float32(pos) / temperature, at_least_float32(cand) / temperature
    if log_q is not None:  # candidates only: the positive is no draw (see the docstring)
        cand = cand - log_q
    cand = cand.masked_fill(candidates[None, :] == target[:, None], float("-inf"))
    logits = torch.cat([pos[:, None], cand], dim=1)  # (n, 1 + M), the positive in column 0
    labels = torch.zeros(len(target), dtype=torch.long, device=target.device)
    return F.cross_entropy(logits, labels, reduction=reduction)


def in_batch_probability(counts: np.ndarray) -> np.ndarray:
    """(V,) p_train(c): the probability that an in-batch candidate (a training target) is item
    c, count(c) / T with T the true number of training targets. An item with no training count
    (e.g. a BERT4Rec slot labelled with a sequence's first item, which is never a next-item
    target) gets the floor 1 / T, as if seen once, so its logQ stays finite; the floor is not
    added to T, so the real targets' probabilities are not diluted. Padding (0) is 0."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts[1:].sum()
    if total <= 0:
        raise ValueError("the training-target counts are all zero")
    p = counts / total
    p[1:][counts[1:] <= 0] = 1.0 / total
    p[0] = 0.0
    return p


def step_seed(seed: int, epoch: int, step: int) -> int:
    """The negatives' seed of one optimizer step, the same on every rank and after a resume."""
    return int(np.random.SeedSequence([seed, epoch, step, 0x5EED]).generate_state(1)[0])


class NegativeSampler:
    """K ids in 1..n_items with replacement: uniform, or ∝ count ** alpha (inverse CDF, so any
    catalogue size works; ``torch.multinomial`` stops at 2^24 categories).

    Example::

        sampler = NegativeSampler("popularity", n_items=1000, counts=counts, alpha=0.75)
        ids = sampler.draw(1024, torch.Generator().manual_seed(1))   # (1024,) in 1..1000
    """

    def __init__(
        self, kind: str, n_items: int, counts: np.ndarray | None = None, alpha: float = 1.0
    ) -> None:
        self.kind, self.n_items = kind, n_items
        self.prob = np.zeros(n_items + 1)  # (V,) q(c); 0 for padding
        if kind == "uniform":
            self.prob[1:] = 1.0 / n_items
            self.cdf = None
        elif kind == "popularity":
            if counts is None or len(counts) != n_items + 1:
                raise ValueError("the popularity sampler needs (n_items + 1,) training counts")
            w = np.asarray(counts[1:], dtype=np.float64) ** alpha
            if w.sum() <= 0:
                raise ValueError("the popularity sampler's counts are all zero")
            self.prob[1:] = w / w.sum()
            self.cdf = torch.from_numpy(np.cumsum(self.prob[1:]))  # (n_items,) float64
        else:
            raise ValueError(f"negative sampler {kind!r} is not uniform or popularity")

    def draw(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """(k,) long ids in 1..n_items (CPU)."""
        if self.cdf is None:
            return torch.randint(1, self.n_items + 1, (k,), generator=generator)
        u = torch.rand(k, generator=generator, dtype=torch.float64) * self.cdf[-1]
        idx = torch.searchsorted(self.cdf, u, right=True).clamp_(max=self.n_items - 1)
        return idx + 1


@dataclass(frozen=True)
class SoftmaxOptions:
    """The sampled softmax's settings (the trainer fills them from ``train.*``)."""

    n_negatives: int = 1024  # train.n_negatives: K shared draws per step
    sampler: str = "uniform"  # train.negative_sampler: uniform | popularity
    alpha: float = 1.0  # train.negative_alpha: popularity exponent
    in_batch: bool = True  # train.in_batch_negatives
    logq: bool = True  # train.logq_correction
    temperature: float = 1.0  # train.softmax_temperature
    seed: int = 0  # train.seed: the draws of step (epoch, step) come from (seed, epoch, step)


class SampledSoftmax:
    """A run's sampled softmax; ``at_step(epoch, step)`` gives one step's candidates.

    Args:
        options: the settings.
        n_items: real items (ids 1..n_items).
        counts: (n_items + 1,) training-target counts (the examples' ``item_counts``).
        device: where the logits live.
        gather_ids: every worker's target ids in rank order (no gradient), or None (local only).
    """

    def __init__(
        self,
        options: SoftmaxOptions,
        n_items: int,
        counts: np.ndarray,
        device: torch.device,
        gather_ids: GatherIds | None = None,
    ) -> None:
        self.n_items, self.device, self.gather_ids = n_items, device, gather_ids
        self.seed, self.k = options.seed, options.n_negatives
        self.in_batch, self.logq = options.in_batch, options.logq
        self.temperature = options.temperature
        self.sampler = NegativeSampler(options.sampler, n_items, counts, options.alpha)
        self.p_train = torch.as_tensor(
            in_batch_probability(counts), dtype=torch.float32, device=device
        )
        self.q = torch.as_tensor(self.sampler.prob, dtype=torch.float32, device=device)

    def at_step(self, epoch: int, step: int) -> StepSoftmax:
        g = torch.Generator().manual_seed(step_seed(self.seed, epoch, step))
        negatives = self.sampler.draw(self.k, g).to(self.device)
        return StepSoftmax(self, negatives)


class StepSoftmax:
    """One step's shared negatives; ``loss`` scores rows against them (+ the in-batch targets)."""

    def __init__(self, owner: SampledSoftmax, negatives: torch.Tensor) -> None:
        self.owner, self.negatives = owner, negatives

    def candidates(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(M,) candidate ids for this step's rows and their (M,) log expected counts (or None):
        computed for the M candidates only, never over the whole catalogue."""
        o, parts = self.owner, [self.negatives]
        n_in = 0
        if o.in_batch:
            batch_ids = target if o.gather_ids is None else o.gather_ids(target)
            parts.insert(0, batch_ids)
            n_in = len(batch_ids)
        cands = torch.cat(parts)
        if not o.logq:
            return cands, None
        expected = n_in * o.p_train[cands] + len(self.negatives) * o.q[cands]  # (M,)
        return cands, torch.log(expected.clamp(min=1e-30))

    def loss(
        self,
        seq_repr: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        sparse: bool = False,
        reduction: str = "mean",
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sampled CE of (n, D) rows with (n,) targets; ``valid`` (n,) bool picks the rows whose
        targets join the in-batch candidates (BERT4Rec's labelled slots)."""
        batch_targets = target if valid is None else target[valid]
        cands, log_q = self.candidates(batch_targets)
        o = self.owner
        return sampled_ce(
            seq_repr, target, weight, bias, cands, log_q, o.temperature, sparse, reduction
        )


def next_item_ce(
    model: torch.nn.Module,
    seq_repr: torch.Tensor,
    target: torch.Tensor,
    softmax: StepSoftmax | None,
    full_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The next-item CE (mean over rows): full over the model's ``item_scores`` when ``softmax``
    is None, else sampled against ``model.item_embedding`` (+ ``output_bias`` if it has one).

    Args:
        model: the bare model (its ``item_embedding``, ``item_scores``).
        seq_repr: (n, D); target: (n,).
        softmax: this step's sampled softmax, or None for the reference CE.
        full_logits: (n, D) -> (n, V') logits of the full CE (default ``model.item_scores``).
    """
    if softmax is None:
        return ce_loss((full_logits or model.item_scores)(seq_repr), target)
    emb, bias = model.item_embedding, getattr(model, "output_bias", None)
    return softmax.loss(seq_repr, target, emb.weight, bias, sparse=emb.sparse)
