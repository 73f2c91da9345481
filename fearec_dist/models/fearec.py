"""FEARec (Du et al., SIGIR 2023), as the official code computes it (spec/fearec.md).

Shapes: B batch, L max_seq_len, D hidden size, H heads, E = D / H, F = L // 2 + 1 rfft bins,
k delays, V = n_items + 1.

Each FEA block mixes two branches of one set of projections Q, K, V (spec §3):
- Branch A (always): the band-limited cross-spectrum of queries and keys gives an
  auto-correlation over lags, averaged over heads and channels; the top-k lags pick circular
  time delays of the (unfiltered) values, weighted by a softmax (§3.3). The mean over heads and
  channels is taken before the inverse FFT (the irfft is linear), so one irfft of (B, F) is done.
  The delay aggregation is one batched gather of the (B, L) delay weights through a precomputed
  circulant index (L, L), applied with one bmm.
- Branch B (``dual_domain``): causal self-attention on band-filtered q/k/v (§3.4).
C = (1 - γ) C_freq + γ C_time, then dense + dropout + residual + LN, then the FFN. A branch with
weight 0 is skipped (γ = 0 or 1): its product with 0 is 0, only the dropout RNG stream differs.

Layer l keeps its own band of rfft bins (the "ramp", §3.2): the input-side layer the highest
frequencies, deeper layers sliding toward low ones. Band masks are constant buffers, not state.

Branch A uses batch-shared delays in training and per-sample delays in eval mode (§10.7, the
reference's behaviour). With batch-shared delays, W workers each pick the delays from their own
batch, like BatchNorm's local statistics, so W workers are not exactly one big batch;
``per_sample_delays_in_training`` removes that dependence (a departure from the reference).
FFTs and mask arithmetic run in float32 under autocast (§10.14).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from fearec_dist.config import ConfigError
from fearec_dist.models.layers import (
    Dropout,
    FeedForward,
    SequentialBase,
    TransformerConfig,
    at_least_float32,
    causal_padding_mask,
    dropout,
    gather_last,
)
from fearec_dist.models.losses import Candidates, ce_loss, freq_distance
from fearec_dist.models.spec import ModelSpec

log = logging.getLogger(__name__)

CONTRASTS = ("none", "un", "su", "us", "us_x")
FREQ_REG_WEIGHT = 0.1  # hard-coded in the reference (spec §5.4)


@dataclass
class FEARecConfig(TransformerConfig):
    """FEARec's keys; defaults are the official repo's (`FEARec.yaml` + `seq.yaml`, spec §7).
    ``attn_dropout`` applies to Branch B's attention probabilities only."""

    global_ratio: float = 1.0  # g: band width ratio (§3.2)
    topk_factor: float = 1.0  # k = int(topk_factor * ln L) delays (§3.3)
    dual_domain: bool = False  # Branch B on/off
    band_limit_time: bool = False  # RecBole `std`: band-limit Branch B's q/k/v too
    spatial_ratio: float = 0.0  # γ: weight of Branch B (the time domain)
    contrast: str = "us_x"  # none | un | su | us | us_x (§5.3); RecBole 1.2.1's None = "none"
    sim: str = "dot"  # dot | cos
    tau: float = 1.0  # InfoNCE temperature
    lmd: float = 0.1  # weight of the unsupervised (dropout-view) InfoNCE, term "nce"
    lmd_sem: float = 0.1  # weight of the same-target InfoNCE, term "nce_sem"
    freq_reg: bool = False  # RecBole `fredom`: frequency regulariser (§5.4), only with us_x
    freq_reg_pairs: str = "us_x"  # RecBole `fredom_type`: un | su | us | us_x
    per_sample_delays_in_training: bool = False  # reference: batch-shared delays in training

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.global_ratio <= 1.0:
            raise ConfigError(f"model.global_ratio: must be in (0, 1], got {self.global_ratio}")
        if not 0.0 <= self.spatial_ratio <= 1.0:
            raise ConfigError(f"model.spatial_ratio: must be in [0, 1], got {self.spatial_ratio}")
        if self.topk_factor <= 0:
            raise ConfigError(f"model.topk_factor: must be > 0, got {self.topk_factor}")
        if self.contrast not in CONTRASTS:
            raise ConfigError(f"model.contrast: {self.contrast!r} is not one of {CONTRASTS}")
        if self.freq_reg_pairs not in CONTRASTS[1:]:
            raise ConfigError(
                f"model.freq_reg_pairs: {self.freq_reg_pairs!r} is not one of {CONTRASTS[1:]}"
            )
        if self.sim not in ("dot", "cos"):
            raise ConfigError(f"model.sim: {self.sim!r} is not dot or cos")
        if self.tau <= 0:
            raise ConfigError(f"model.tau: must be > 0, got {self.tau}")

    def check_length(self, max_seq_len: int) -> None:
        """Checks what depends on L: 1 <= k <= L (§10.6) and a non-empty band per layer."""
        k = topk_count(self.topk_factor, max_seq_len)
        if not 1 <= k <= max_seq_len:
            raise ConfigError(
                f"model.topk_factor: k = int({self.topk_factor} * ln {max_seq_len}) = {k} "
                f"delays, must be in [1, L={max_seq_len}]"
            )
        for layer in range(self.n_layers):
            if not layer_band(max_seq_len, self.n_layers, self.global_ratio, layer):
                raise ConfigError(
                    f"model.global_ratio: layer {layer} of {self.n_layers} gets no frequency bin "
                    f"at L={max_seq_len}, g={self.global_ratio}"
                )


def topk_count(factor: float, max_seq_len: int) -> int:
    """k of spec §3.3 step 5: int(factor · ln L), truncated."""
    return int(factor * math.log(max_seq_len))


def layer_band(max_seq_len: int, n_layers: int, global_ratio: float, layer: int) -> range:
    """The rfft bins [left, right) of layer ``layer`` (spec §3.2, Python floats in its order).

    ``n_layers = 1`` divides by zero in the reference (§10.4); here slide = 0 then.
    """
    n_bins = max_seq_len // 2 + 1
    mode_global = global_ratio > 1 / n_layers
    slide = (n_bins * (1 - global_ratio)) // (n_layers - 1) if n_layers > 1 else 0.0
    if mode_global:
        width, step = global_ratio, slide
    else:
        width, step = 1 / n_layers, (1 / n_layers) * n_bins
    left = int(n_bins * (1 - width) - layer * step)
    right = int(n_bins - layer * step)
    return range(left, right)


def circulant_index(max_seq_len: int) -> torch.Tensor:
    """(L, L) long: [t, s] = (s - t) mod L, the delay τ at which output t reads input s."""
    t = torch.arange(max_seq_len)
    return (t[None, :] - t[:, None]) % max_seq_len


def lag_index(max_seq_len: int) -> torch.Tensor:
    """(L, L) long into a flattened (L·L) Gram matrix: [τ, t] = ((t + τ) mod L)·L + t, so that
    summing G.flatten()[lag_index] over t gives Σ_t G[(t + τ) mod L, t], the lag-τ correlation."""
    t = torch.arange(max_seq_len)
    return ((t[None, :] + t[:, None]) % max_seq_len) * max_seq_len + t[None, :]


def band_projection(max_seq_len: int, bins: range) -> torch.Tensor:
    """(L, L) float32 matrix P with P @ x = irfft(1_bins ⊙ rfft(x), n=L) along time (§3.2).

    Filtering to a fixed set of bins is a fixed linear map of the time axis (real, symmetric,
    P² = P); it is built once here with torch.fft in float64 (n=L explicit, so odd L works,
    §10.5) and applied in forward as a matmul, which on CPU costs a fraction of an rfft/irfft
    pair over (B, L, D) and gives the same numbers to float round-off.
    """
    keep = torch.zeros(max_seq_len // 2 + 1, dtype=torch.float64)
    keep[bins.start : bins.stop] = 1.0
    eye = torch.eye(max_seq_len, dtype=torch.float64)
    cols = torch.fft.irfft(torch.fft.rfft(eye, dim=0) * keep[:, None], n=max_seq_len, dim=0)
    return cols.float()  # column s = filtered unit impulse at s


def aggregate_delays(
    values: torch.Tensor, delay: torch.Tensor, weight: torch.Tensor, circulant: torch.Tensor
) -> torch.Tensor:
    """A[b, t] = Σ_i w[b, i] · values[b, (t + τ_{b,i}) mod L]  (§3.3 step 7).

    The weights are scattered to a (B, L) weight-per-lag row, spread into the circulant matrix
    M[b, t, s] = w_lag[b, (s - t) mod L] by one gather over ``circulant``, and A = M @ values.

    Args:
        values: (B, L, D).
        delay: (B, k) long, distinct lags per row.
        weight: (B, k).
        circulant: (L, L) from `circulant_index`.

    Returns:
        (B, L, D).
    """
    B, L, _ = values.shape
    per_lag = weight.new_zeros(B, L).scatter(1, delay, weight)  # (B, L)
    # torch.gather rather than per_lag[:, circulant]: its backward is a scatter-add, several
    # times faster on CPU than advanced indexing's accumulate
    mix = per_lag.gather(1, circulant.view(1, L * L).expand(B, -1)).view(B, L, L)
    return torch.bmm(mix, values)


class HybridAttention(nn.Module):
    """One FEA block's attention (spec §3): Branch A, optional Branch B, fusion, residual, LN.

    Both branches start from the same Gram matrix: Branch A's correlation at lag τ is
    R[τ] = (1/D) Σ_t (q̃ k̃ᵀ)[(t + τ) mod L, t] with q̃ = P_I q, k̃ = P_I k — the same as
    irfft(1_I ⊙ Q_f ⊙ conj K_f) averaged over heads and channels (§3.3 steps 1-4) — and with
    ``filter_time`` Branch B's scores are the per-head parts of that q̃ k̃ᵀ, so one batched
    matmul serves both.

    Args:
        band: rfft bins I_l of this layer (§3.2).
        max_seq_len: L.
        k: number of delays.
        dual_domain: Branch B on/off; ``spatial_ratio`` (γ) is its weight.
        filter_time: band-limit Branch B's q/k/v to ``band`` too (RecBole ``std``).
        per_sample_delays_in_training: per-row delays in training as in eval (not the reference).
    """

    def __init__(
        self,
        hidden: int,
        n_heads: int,
        hidden_dropout: float,
        attn_dropout: float,
        layer_norm_eps: float,
        max_seq_len: int,
        band: range,
        k: int,
        dual_domain: bool,
        filter_time: bool,
        spatial_ratio: float,
        per_sample_delays_in_training: bool = False,
    ) -> None:
        super().__init__()
        self.n_heads, self.head_size, self.k = n_heads, hidden // n_heads, k
        self.attn_dropout = attn_dropout
        self.gamma = spatial_ratio if dual_domain else 0.0
        self.per_sample_train = per_sample_delays_in_training
        self.query_layer = nn.Linear(hidden, hidden)
        self.key_layer = nn.Linear(hidden, hidden)
        self.value_layer = nn.Linear(hidden, hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.out_dropout = Dropout(hidden_dropout)
        self.full_band = len(band) == max_seq_len // 2 + 1  # P_I = identity
        self.filter_time = filter_time and not self.full_band  # J_l = all bins: no filtering
        # constant buffers, not state (RecBole has no such keys)
        self.register_buffer("band_proj", band_projection(max_seq_len, band), persistent=False)
        self.register_buffer("lag_index", lag_index(max_seq_len), persistent=False)
        self.register_buffer("circulant", circulant_index(max_seq_len), persistent=False)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.head_size).transpose(1, 2)  # (B, H, L, E)

    def delays(self, corr: torch.Tensor, n_views: int) -> tuple[torch.Tensor, torch.Tensor]:
        """corr (B, L) -> delays (B, k) long and their softmax weights (B, k) (§3.3 step 6).

        In training the delays are shared by each of the ``n_views`` stacked view batches (as
        if each view were its own forward call, the reference's behaviour); in eval, per row.
        """
        B, L = corr.shape
        if self.training and not self.per_sample_train:
            shared = corr.view(n_views, B // n_views, L).mean(dim=1).topk(self.k).indices
            idx = shared.repeat_interleave(B // n_views, dim=0)  # (B, k)
            return idx, corr.gather(1, idx).softmax(dim=-1)
        top, idx = corr.topk(self.k, dim=-1)
        return idx, top.softmax(dim=-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, n_views: int = 1) -> torch.Tensor:
        """x (B, L, D), mask additive (B, 1, L, L) (Branch B only) -> (B, L, D)."""
        B, L, D = x.shape
        q, k, v = self.query_layer(x), self.key_layer(x), self.value_layer(x)  # (B, L, D) each
        with torch.autocast(x.device.type, enabled=False):  # filters and masks in float32
            q, k, v = at_least_float32(q), at_least_float32(k), at_least_float32(v)
            proj = self.band_proj.to(q.dtype)  # no-op unless the model runs in float64
            scores = v_time = None
            if self.gamma > 0.0:  # Branch B inputs (§3.4 step 1)
                if self.filter_time:
                    q, k, v_time = proj @ q, proj @ k, proj @ v  # (B, L, D) band-limited
                else:
                    v_time = v
                scores = self.split(q) @ self.split(k).transpose(-1, -2)  # (B, H, L, L)
            ctx = 0.0
            if self.gamma < 1.0:  # Branch A (§3.3)
                if scores is not None and (self.filter_time or self.full_band):
                    gram = scores.sum(dim=1)  # (B, L, L): q̃ k̃ᵀ, heads summed
                else:
                    q_band = q if self.full_band else proj @ q
                    gram = q_band @ k.transpose(1, 2)  # (B, L, L)
                lags = self.lag_index.view(1, L * L).expand(B, -1)
                lagged = gram.reshape(B, L * L).gather(1, lags).view(B, L, L)  # [b, τ, t]
                corr = lagged.sum(dim=-1) / D  # (B, L): mean over heads and channels
                delay, weight = self.delays(corr, n_views)
                ctx = (1.0 - self.gamma) * aggregate_delays(v, delay, weight, self.circulant)
            if scores is not None:  # Branch B (§3.4 steps 2-3)
                probs = torch.softmax(scores / math.sqrt(self.head_size) + mask, dim=-1)
                probs = dropout(probs, self.attn_dropout, self.training)
                ctx_time = (probs @ self.split(v_time)).transpose(1, 2).reshape(B, L, D)
                ctx = ctx + self.gamma * ctx_time
        return self.LayerNorm(x + self.out_dropout(self.dense(ctx.to(x.dtype))))


class FEABlock(nn.Module):
    """HybridAttention then the feed-forward (spec §2)."""

    def __init__(self, attention: HybridAttention, feed_forward: FeedForward) -> None:
        super().__init__()
        self.hybrid_attention = attention
        self.feed_forward = feed_forward

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, n_views: int = 1) -> torch.Tensor:
        return self.feed_forward(self.hybrid_attention(x, mask, n_views))


class FEAEncoder(nn.Module):
    """n FEA blocks, layer l with its own band (spec §2, §3.2). RecBole also keeps an alias
    ``layer_ramp`` of the last block (duplicate state-dict keys, §10.12); we do not."""

    def __init__(self, c: FEARecConfig, max_seq_len: int) -> None:
        super().__init__()
        if c.n_layers == 1:
            log.info("FEARec with one layer: slide = 0 (the reference divides by zero, §10.4)")
        k = topk_count(c.topk_factor, max_seq_len)
        self.layer = nn.ModuleList(
            FEABlock(
                HybridAttention(
                    c.hidden_size,
                    c.n_heads,
                    c.hidden_dropout,
                    c.attn_dropout,
                    c.layer_norm_eps,
                    max_seq_len,
                    layer_band(max_seq_len, c.n_layers, c.global_ratio, i),
                    k,
                    c.dual_domain,
                    c.band_limit_time,
                    c.spatial_ratio,
                    c.per_sample_delays_in_training,
                ),
                FeedForward(c.hidden_size, c.inner_size, c.hidden_dropout, c.layer_norm_eps),
            )
            for i in range(c.n_layers)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, n_views: int = 1) -> torch.Tensor:
        for block in self.layer:
            x = block(x, mask, n_views)
        return x


class FEARec(SequentialBase):
    """FEARec over ``n_items`` real items (item table has n_items + 1 rows, row 0 = padding).

    Example::

        model = FEARec(FEARecConfig(global_ratio=0.6), n_items=12101, max_seq_len=50)
        seq_repr = model(item_seq, seq_len)  # (B, 64)
        logits = model.item_scores(seq_repr)  # (B, 12102)
    """

    def __init__(self, config: FEARecConfig, n_items: int, max_seq_len: int) -> None:
        config.check_length(max_seq_len)
        c = config
        super().__init__(
            n_items + 1, max_seq_len, c.hidden_size, c.hidden_dropout, c.layer_norm_eps
        )
        self.config, self.n_items = config, n_items
        self.item_encoder = FEAEncoder(c, max_seq_len)
        self.init_parameters()

    @property
    def needs_partner(self) -> bool:
        """Whether training batches must carry a same-target partner (``pos_seq``)."""
        return needs_partner(self.config)

    def forward(
        self, item_seq: torch.Tensor, lengths: torch.Tensor, n_views: int = 1
    ) -> torch.Tensor:
        """item_seq (B, L) right-padded, lengths (B,) -> seq_repr (B, D) at position len - 1.

        ``n_views`` > 1 says the batch stacks that many equal-size view batches (the loss runs
        its dropout views and partners in one pass); training-mode delays are then picked per
        view batch, exactly as separate calls would pick them.
        """
        if item_seq.shape[0] % n_views:
            raise ValueError(f"batch of {item_seq.shape[0]} rows is not {n_views} equal views")
        uses_mask = self.config.dual_domain and self.config.spatial_ratio > 0
        mask = causal_padding_mask(item_seq) if uses_mask else None  # Branch B only
        hidden = self.item_encoder(self.embed(item_seq), mask, n_views)  # (B, L, D)
        return gather_last(hidden, lengths)


# contrast -> {term: (view, view)}; "u" feeds CE, "u2" is a second dropout view of the same input,
# "pos" the same-target partner (spec §5.1, §5.3)
NCE_PAIRS = {
    "none": {},
    "un": {"nce": ("u", "u2")},
    "su": {"nce_sem": ("u", "pos")},
    "us": {"nce": ("u", "u2"), "nce_sem": ("u", "pos")},
    "us_x": {"nce_sem": ("u2", "pos")},
}
FREQ_PAIRS = {  # fredom_type -> pairs (§5.4)
    "un": [("u", "u2")],
    "su": [("u", "pos")],
    "us": [("u", "u2"), ("u", "pos")],
    "us_x": [("u2", "pos")],
}


def loss_terms(
    model: FEARec, batch: dict[str, torch.Tensor], gather=None, forward=None
) -> dict[str, torch.Tensor]:
    """L = ce + lmd·nce + lmd_sem·nce_sem + 0.1·freq for the config's ``contrast`` (§5.3-5.5).

    Args:
        model: the bare FEARec; ``forward``: the forward with gradient sync (the trainer's DDP
            wrapper, so DDP's hooks fire), default ``model``.
        batch: ``item_seq`` (B, L), ``seq_len`` (B,), ``target`` (B,); ``pos_seq`` (B, L) and
            ``pos_len`` (B,), the same-target partner, when ``needs_partner``.
        gather: cross-worker gather for the InfoNCE candidates (see losses.py), or None.

    Returns:
        ``loss`` (the weighted total) and the unweighted terms present: ``ce``, ``nce``,
        ``nce_sem``, ``freq``. Each is a mean over this worker's rows.
    """
    c: FEARecConfig = model.config
    forward = forward or model
    pairs = NCE_PAIRS[c.contrast]
    used = {name for pair in pairs.values() for name in pair}
    # every view in one stacked forward (one DDP forward per step, larger matmuls); each row
    # gets its own dropout masks, and training delays are picked per view (n_views)
    names = ["u"] + [name for name in ("u2", "pos") if name in used]
    sources = {
        "u": ("item_seq", "seq_len"),
        "u2": ("item_seq", "seq_len"),
        "pos": ("pos_seq", "pos_len"),
    }
    seqs = torch.cat([batch[sources[name][0]] for name in names])  # (V·B, L)
    lens = torch.cat([batch[sources[name][1]] for name in names])
    stacked = forward(seqs, lens, n_views=len(names)) if len(names) > 1 else forward(seqs, lens)
    views = dict(zip(names, stacked.chunk(len(names))))  # each (B, D)
    terms = {"ce": ce_loss(model.item_scores(views["u"]), batch["target"])}
    if pairs:
        cands = Candidates({name: views[name] for name in sorted(used)}, c.sim, gather)
        for term, (a, b) in pairs.items():
            terms[term] = cands.info_nce(a, b, c.tau)
    if c.contrast == "us_x" and c.freq_reg:  # the reference evaluates it in this branch only
        terms["freq"] = sum(
            freq_distance(views[a], views[b]) for a, b in FREQ_PAIRS[c.freq_reg_pairs]
        )
    weights = {"ce": 1.0, "nce": c.lmd, "nce_sem": c.lmd_sem, "freq": FREQ_REG_WEIGHT}
    total = sum(weights[name] * value for name, value in terms.items())
    return {"loss": total, **terms}


PRESETS = {
    # spec §7, the `fearec.sh` column: what the authors ship for Beauty
    "fearec_official": {
        "contrast": "us_x",
        "sim": "dot",
        "tau": 1.0,
        "lmd": 0.1,
        "lmd_sem": 0.1,
        "global_ratio": 0.6,
        "topk_factor": 1.0,
        "dual_domain": True,
        "band_limit_time": True,
        "spatial_ratio": 0.1,
        "hidden_dropout": 0.5,
        "attn_dropout": 0.5,
        "n_layers": 2,
        "n_heads": 2,
        "hidden_size": 64,
        "inner_size": 256,
    },
}
# the paper presents the frequency regulariser as part of FEARec (spec §7)
PRESETS["fearec_paper"] = PRESETS["fearec_official"] | {"freq_reg": True, "freq_reg_pairs": "us_x"}


def needs_partner(config: FEARecConfig) -> bool:
    """Whether training batches must carry a same-target partner (``pos_seq``)."""
    return config.contrast in ("su", "us", "us_x")


SPEC = ModelSpec(
    config_cls=FEARecConfig,
    model_cls=FEARec,
    loss_terms=loss_terms,
    needs_partner=needs_partner,
    presets=PRESETS,
)

full_scores = SPEC.full_scores  # (B, V) scores; DESIGN.md: every model module exposes it
