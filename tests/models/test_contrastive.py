"""InfoNCE (spec fearec.md §5.2), the frequency regulariser (§5.4), FEARec's total loss (§5.3,
§5.5), and simulated shards: W workers with gathered candidates give the one-process loss and
gradients, unequal shards weighted by n_w·W/N as the trainer does."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fearec_dist.models import build_model
from fearec_dist.models.fearec import FREQ_REG_WEIGHT, loss_terms
from fearec_dist.models.losses import Candidates, ce_loss, freq_distance, info_nce


def closed_form(a: torch.Tensor, b: torch.Tensor, tau: float, sim: str) -> torch.Tensor:
    """mean_r [logsumexp_{c != r} S_rc - S_r,pos(r)] with explicit loops (float64)."""
    z = torch.cat([a, b]).double()
    if sim == "cos":
        z = z / z.norm(dim=-1, keepdim=True)
    S = z @ z.T / tau
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for r in range(n2):
        pos = r + n if r < n else r - n
        others = [S[r, c] for c in range(n2) if c != r]
        total += torch.logsumexp(torch.stack(others), 0) - S[r, pos]
    return total / n2


@pytest.mark.parametrize("sim", ["dot", "cos"])
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_info_nce_closed_form_and_symmetry(sim: str, tau: float) -> None:
    torch.manual_seed(0)
    a, b = torch.randn(5, 6), torch.randn(5, 6)
    got = info_nce(a, b, tau, sim)
    torch.testing.assert_close(got.double(), closed_form(a, b, tau, sim), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(info_nce(b, a, tau, sim), got)


def test_info_nce_hand_value() -> None:
    # N = 1: z = [a; b], each row has one candidate (its partner) -> loss 0
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]])
    assert info_nce(a, b, 1.0, "dot").item() == pytest.approx(0.0, abs=1e-7)
    # N = 2, dot, τ = 1: row 0 (a0 = e1): S = [1, 0 (a1=e2), 1 (b0=e1), 0 (b1=0)] minus itself
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    rows = [
        math.log(math.exp(0) + math.exp(1) + math.exp(0)) - 1,  # a0: {a1, b0, b1}, pos b0
        math.log(math.exp(0) + math.exp(0) + math.exp(0)) - 0,  # a1: {a0, b0, b1}, pos b1
        math.log(math.exp(1) + math.exp(0) + math.exp(0)) - 1,  # b0: {a0, a1, b1}, pos a0
        math.log(3.0) - 0,  # b1: all zeros
    ]
    assert info_nce(a, b, 1.0, "dot").item() == pytest.approx(sum(rows) / 4, abs=1e-6)


def test_freq_distance_closed_form() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    d = 8
    t = torch.arange(d, dtype=torch.float64)
    f = torch.arange(d // 2 + 1, dtype=torch.float64)
    dft = torch.exp(-2j * math.pi * f[:, None] * t[None, :] / d) / math.sqrt(d)  # ortho
    diff = (a - b).double().to(torch.complex128) @ dft.T  # (3, d/2+1)
    want = diff.abs().mean()
    torch.testing.assert_close(freq_distance(a, b).double(), want, atol=1e-6, rtol=1e-6)


BATCH_N, L_TOY, ITEMS = 6, 8, 20


def toy_batch(n: int = BATCH_N) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    lens = torch.randint(1, L_TOY + 1, (n,), generator=g)
    pos_len = torch.randint(1, L_TOY + 1, (n,), generator=g)
    keep = torch.arange(L_TOY)[None, :] < lens[:, None]
    keep_pos = torch.arange(L_TOY)[None, :] < pos_len[:, None]
    return {
        "item_seq": torch.randint(1, ITEMS + 1, (n, L_TOY), generator=g) * keep,
        "seq_len": lens,
        "target": torch.randint(1, ITEMS + 1, (n,), generator=g),
        "pos_seq": torch.randint(1, ITEMS + 1, (n, L_TOY), generator=g) * keep_pos,
        "pos_len": pos_len,
    }


@pytest.mark.parametrize("contrast", ["none", "un", "su", "us", "us_x"])
@pytest.mark.parametrize("freq_reg_pairs", ["un", "su", "us", "us_x"])
def test_total_is_weighted_sum(contrast: str, freq_reg_pairs: str) -> None:
    torch.manual_seed(0)
    model = build_model(
        "fearec_official",
        n_items=ITEMS,
        max_seq_len=L_TOY,
        contrast=contrast,
        freq_reg=True,
        freq_reg_pairs=freq_reg_pairs,
        lmd=0.3,
        lmd_sem=0.7,
    )
    out = loss_terms(model, toy_batch())
    expected_terms = {
        "none": {"ce"},
        "un": {"ce", "nce"},
        "su": {"ce", "nce_sem"},
        "us": {"ce", "nce", "nce_sem"},
        "us_x": {"ce", "nce_sem", "freq"},  # the regulariser only inside us_x (§5.4)
    }[contrast]
    assert set(out) - {"loss"} == expected_terms
    weights = {"ce": 1.0, "nce": 0.3, "nce_sem": 0.7, "freq": FREQ_REG_WEIGHT}
    total = sum(weights[k] * v for k, v in out.items() if k != "loss")
    torch.testing.assert_close(out["loss"], total)


def test_us_x_terms_match_their_definitions() -> None:
    # eval mode: the two dropout views coincide, so each term can be recomputed from forward()
    model = build_model(
        "fearec_paper", n_items=ITEMS, max_seq_len=L_TOY, lmd=0.3, lmd_sem=0.7
    ).eval()
    batch = toy_batch()
    out = loss_terms(model, batch)
    with torch.no_grad():
        u = model(batch["item_seq"], batch["seq_len"])
        u_pos = model(batch["pos_seq"], batch["pos_len"])
        ce = F.cross_entropy(u @ model.item_embedding.weight.T, batch["target"])
        nce = info_nce(u, u_pos, 1.0, "dot")
        freq = freq_distance(u, u_pos)
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["nce_sem"], nce)
    torch.testing.assert_close(out["freq"], freq)
    torch.testing.assert_close(out["loss"], ce + 0.7 * nce + 0.1 * freq)


def shard_bounds(sizes: list[int]) -> list[tuple[int, int]]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(s, s + n) for s, n in zip(starts, sizes)]


@pytest.mark.parametrize("sizes", [[6, 6], [3, 3, 3, 3], [5, 2], [1, 4, 2, 5]])
@pytest.mark.parametrize("sim", ["dot", "cos"])
def test_sharded_losses_equal_one_process(sizes: list[int], sim: str) -> None:
    """Each shard: CE + InfoNCE(local rows vs gathered columns) + freq, weighted n_w·W/N, then
    DDP's mean over W -> the one-process loss and gradients."""
    torch.manual_seed(0)
    N, d, V = sum(sizes), 8, 11
    u = torch.randn(N, d, requires_grad=True)
    u2 = torch.randn(N, d, requires_grad=True)
    pos = torch.randn(N, d, requires_grad=True)
    table = torch.randn(V, d, requires_grad=True)
    target = torch.randint(0, V, (N,))
    leaves = [u, u2, pos, table]

    def objective(u_, u2_, pos_, target_, gather) -> torch.Tensor:
        cands = Candidates({"u": u_, "u2": u2_, "pos": pos_}, sim, gather)
        nce = cands.info_nce("u", "u2", 0.7)  # u gathered once, reused below
        nce_sem = cands.info_nce("u", "pos", 0.7)
        return (
            ce_loss(u_ @ table.T, target_)
            + 0.3 * nce
            + 0.5 * nce_sem
            + 0.1 * freq_distance(u2_, pos_)
        )

    whole = objective(u, u2, pos, target, None)
    want = torch.autograd.grad(whole, leaves)

    W = len(sizes)
    bounds = shard_bounds(sizes)
    total = 0.0
    for lo, hi in bounds:
        calls: list[int] = []

        def gather(x: torch.Tensor, lo=lo, hi=hi, calls=calls) -> tuple[torch.Tensor, int]:
            # every worker's rows in rank order; other workers' rows from the same leaves, so
            # their gradients flow back the way an all-gather with autograd sends them home
            calls.append(1)
            for view in (u, u2, pos):
                full = F.normalize(view, dim=-1) if sim == "cos" else view
                if torch.equal(full[lo:hi].detach(), x.detach()):
                    return torch.cat([full[:lo], x, full[hi:]]), lo
            raise AssertionError("unknown view")

        loss_w = objective(u[lo:hi], u2[lo:hi], pos[lo:hi], target[lo:hi], gather)
        assert len(calls) == 3  # once per view tensor
        total = total + loss_w * (hi - lo) * W / N / W  # trainer weight, then DDP's mean
    got = torch.autograd.grad(total, leaves)
    torch.testing.assert_close(total, whole, atol=1e-6, rtol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("sizes", [[3, 3], [2, 1, 2, 1], [4, 2]])
def test_sharded_fearec_loss_terms_equal_one_process(sizes: list[int]) -> None:
    """The model path: us_x + regulariser in eval mode (per-sample delays, no dropout, so a
    shard's forward equals its rows of the whole batch's forward), float64 so that batch-size
    dependent float32 summation order does not blur the 1e-6 comparison."""
    torch.manual_seed(0)
    model = build_model("fearec_paper", n_items=ITEMS, max_seq_len=L_TOY).double().eval()
    # At init the last LayerNorm (weight 1, bias 0) makes every u sum to ~0, so the DC bin of
    # |rfft(u') - rfft(u+)| sits at the kink of |.|, and its gradient sign is round-off noise.
    # A random bias alone is not enough: with a uniform weight every row sums to Σ bias.
    last_ln = model.item_encoder.layer[-1].feed_forward.LayerNorm
    with torch.no_grad():
        last_ln.bias.normal_(0.0, 0.1)
        last_ln.weight.normal_(1.0, 0.1)
    params = list(model.parameters())
    batch = toy_batch(sum(sizes))
    N = sum(sizes)
    whole = loss_terms(model, batch)["loss"]
    want = torch.autograd.grad(whole, params)

    full_views = [  # us_x gathers u' (second view of item_seq), then the partner
        model(batch["item_seq"], batch["seq_len"]),
        model(batch["pos_seq"], batch["pos_len"]),
    ]
    total = 0.0
    for lo, hi in shard_bounds(sizes):
        calls = iter(full_views)

        def gather(x: torch.Tensor, lo=lo, hi=hi, calls=calls) -> tuple[torch.Tensor, int]:
            full = next(calls)
            torch.testing.assert_close(x, full[lo:hi])
            return torch.cat([full[:lo], x, full[hi:]]), lo

        shard = {k: v[lo:hi] for k, v in batch.items()}
        total = total + loss_terms(model, shard, gather=gather)["loss"] * (hi - lo) / N
    got = torch.autograd.grad(total, params, allow_unused=True)
    torch.testing.assert_close(total, whole, atol=1e-6, rtol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


def test_no_gather_without_contrast() -> None:
    model = build_model("fearec", n_items=ITEMS, max_seq_len=L_TOY, contrast="none")

    def gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        raise AssertionError("gather called without a contrastive term")

    out = loss_terms(model, toy_batch(), gather=gather)
    assert set(out) == {"loss", "ce"}
