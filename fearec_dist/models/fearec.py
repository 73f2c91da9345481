"""FEARec (Du et al., SIGIR 2023), as the official code computes it (spec/fearec.md).

Shapes: B batch, L max_seq_len, D hidden size, H heads, E = D / H, F = L // 2 + 1 rfft bins,
k delays, V = n_items + 1.

Each FEA block mixes two branches of one set of projections Q, K, V (spec §3):
- Branch A (always): the band-limited cross-spectrum of queries and keys gives an
  auto-correlation over lags, averaged over heads and channels; the top-k lags pick circular
  time delays of the (unfiltered) values, weighted by a softmax (§3.3). The average over heads
  and channels is taken before the inverse FFT (it is linear), so one irfft of (B, F) is done.
  The delay aggregation is a (B, L, L) matrix built by one scatter, applied with one bmm.
- Branch B (``dual_domain``): causal self-attention on band-filtered q/k/v (§3.4).
C = (1 - γ) C_freq + γ C_time, then dense + dropout + residual + LN, then the FFN.

Layer l keeps its own band of rfft bins (the "ramp", §3.2): the input-side layer the highest
frequencies, deeper layers sliding toward low ones. Band masks are constant buffers.

Branch A uses batch-shared delays in training and per-sample delays in eval mode (§10.7, the
reference's behaviour). With W workers, each worker picks the shared delays from its own batch,
like BatchNorm's local statistics; ``per_sample_delays_in_training`` removes that dependence.
FFTs and mask arithmetic run in float32 under autocast (§10.14).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fearec_dist.config import ConfigError
from fearec_dist.models.layers import (
    Dropout,
    FeedForward,
    SequentialBase,
    causal_padding_mask,
    dropout,
    gather_last,
    init_weights,
)
from fearec_dist.models.losses import ce_loss, freq_distance, info_nce

CONTRASTS = ("none", "un", "su", "us", "us_x")
FREQ_REG_WEIGHT = 0.1  # hard-coded in the reference (spec §5.4)


@dataclass
class FEARecConfig:
    hidden_size: int = 64
    n_layers: int = 2
    n_heads: int = 2
    inner_size: int = 256
    hidden_dropout: float = 0.5
    attn_dropout: float = 0.5  # Branch B's attention probabilities only
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    global_ratio: float = 1.0  # g: band width ratio (§3.2)
    topk_factor: float = 1.0  # k = int(topk_factor * ln L)
    dual_domain: bool = False  # Branch B on/off
    band_limit_time: bool = False  # RecBole `std`: band-limit Branch B's q/k/v too
    spatial_ratio: float = 0.0  # γ: weight of Branch B (the time domain)
    contrast: str = "none"  # none | un | su | us | us_x (§5.3)
    sim: str = "dot"  # dot | cos
    tau: float = 1.0
    lmd: float = 0.1  # weight of the unsupervised (dropout-view) InfoNCE
    lmd_sem: float = 0.1  # weight of the same-target InfoNCE
    freq_reg: bool = False  # RecBole `fredom`: frequency-domain regulariser (§5.4), us_x only
    freq_reg_pairs: str = "us_x"  # RecBole `fredom_type`: un | su | us | us_x
    per_sample_delays_in_training: bool = False  # reference: batch-shared delays in training

    def __post_init__(self) -> None:
        if self.hidden_size % self.n_heads:
            raise ConfigError(
                f"model.n_heads: hidden_size {self.hidden_size} is not a multiple of {self.n_heads}"
            )
        if self.n_layers < 1:
            raise ConfigError(f"model.n_layers: must be >= 1, got {self.n_layers}")
        for key in ("hidden_dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key}: must be in [0, 1), got {getattr(self, key)}")
        for key in ("global_ratio", "spatial_ratio"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"model.{key}: must be in [0, 1], got {getattr(self, key)}")
        if self.global_ratio == 0:
            raise ConfigError("model.global_ratio: must be > 0")
        if self.contrast not in CONTRASTS:
            raise ConfigError(f"model.contrast: {self.contrast!r} is not one of {CONTRASTS}")
        if self.freq_reg_pairs not in CONTRASTS[1:]:
            raise ConfigError(f"model.freq_reg_pairs: {self.freq_reg_pairs!r} is not valid")
        if self.sim not in ("dot", "cos"):
            raise ConfigError(f"model.sim: {self.sim!r} is not dot or cos")
        if self.tau <= 0:
            raise ConfigError(f"model.tau: must be > 0, got {self.tau}")

    def check_length(self, max_seq_len: int) -> None:
        """§10.6: k = int(factor · ln L) must lie in [1, L]."""
        k = topk_count(self.topk_factor, max_seq_len)
        if not 1 <= k <= max_seq_len:
            raise ConfigError(
                f"model.topk_factor: k = int({self.topk_factor} * ln {max_seq_len}) = {k} "
                f"delays, must be in [1, L={max_seq_len}]"
            )


def topk_count(factor: float, max_seq_len: int) -> int:
    """k of spec §3.3 step 5: int(factor · ln L), truncated."""
    return int(factor * math.log(max_seq_len))


def layer_band(max_seq_len: int, n_layers: int, global_ratio: float, layer: int) -> range:
    """The rfft bins of layer ``layer`` (spec §3.2, float64 in the reference's order).

    n_layers = 1 divides by zero in the reference (§10.4); here slide = 0 then.
    """
    n_bins = max_seq_len // 2 + 1
    mode_global = global_ratio > 1 / n_layers
    slide = (n_bins * (1 - global_ratio)) // (n_layers - 1) if n_layers > 1 else 0.0
    if mode_global:
        width, step = global_ratio, slide
    else:
        width, step = 1 / n_layers, n_bins * (1 / n_layers)
    left = int(n_bins * (1 - width) - layer * step)
    right = int(n_bins - layer * step)
    return range(left, right)


class HybridAttention(nn.Module):
    """One FEA block's attention (spec §3): Branch A, optional Branch B, fusion, residual, LN."""

    def __init__(self, c: FEARecConfig, max_seq_len: int, layer: int) -> None:
        super().__init__()
        self.n_heads, self.head_size = c.n_heads, c.hidden_size // c.n_heads
        self.k = topk_count(c.topk_factor, max_seq_len)
        self.dual, self.gamma = c.dual_domain, c.spatial_ratio
        self.attn_dropout = c.attn_dropout
        self.per_sample_train = c.per_sample_delays_in_training
        self.query_layer = nn.Linear(c.hidden_size, c.hidden_size)
        self.key_layer = nn.Linear(c.hidden_size, c.hidden_size)
        self.value_layer = nn.Linear(c.hidden_size, c.hidden_size)
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.out_dropout = Dropout(c.hidden_dropout)
        n_bins = max_seq_len // 2 + 1
        band = torch.zeros(n_bins)
        band[list(layer_band(max_seq_len, c.n_layers, c.global_ratio, layer))] = 1.0
        self.register_buffer("band", band, persistent=False)  # I_l as a 0/1 mask (F,)
        self.filter_time = c.band_limit_time and bool(band.sum() < n_bins)  # J_l != all bins

    def delays(self, corr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """corr (B, L) -> delays (B, k) long and their softmax weights (B, k) (§3.3 step 6)."""
        if self.training and not self.per_sample_train:
            idx = corr.mean(dim=0).topk(self.k).indices  # (k,) shared by the batch
            idx = idx.expand(corr.shape[0], -1)
            return idx, corr.gather(1, idx).softmax(dim=-1)
        values, idx = corr.topk(self.k, dim=-1)
        return idx, values.softmax(dim=-1)

    @staticmethod
    def aggregate(values: torch.Tensor, delay: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A[b, t] = Σ_i w[b, i] · values[b, (t + τ_i) mod L]  (§3.3 step 7), one scatter + bmm.

        Args:
            values: (B, L, D); delay, weight: (B, k).
        """
        B, L, _ = values.shape
        t = torch.arange(L, device=values.device)
        src = (t[None, :, None] + delay[:, None, :]) % L  # (B, L, k): position read by t
        mix = values.new_zeros(B, L, L)
        mix.scatter_add_(2, src, weight[:, None, :].expand(B, L, -1).to(values.dtype))
        return torch.bmm(mix, values)  # (B, L, D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.query_layer(x), self.key_layer(x), self.value_layer(x)
        with torch.autocast(x.device.type, enabled=False):
            qf = torch.fft.rfft(q.float(), dim=1)  # (B, F, D)
            kf = torch.fft.rfft(k.float(), dim=1)
            cross = (qf * kf.conj()).mean(dim=-1) * self.band  # (B, F): mean over heads, channels
            corr = torch.fft.irfft(cross, n=L, dim=1)  # (B, L) auto-correlation per lag
            delay, weight = self.delays(corr)
            ctx = self.aggregate(v.float(), delay, weight)  # (B, L, D)
            if self.dual:
                ctx = (1 - self.gamma) * ctx + self.gamma * self.time_branch(qf, kf, q, k, v, mask)
        return self.LayerNorm(x + self.out_dropout(self.dense(ctx.to(x.dtype))))

    def time_branch(self, qf, kf, q, k, v, mask) -> torch.Tensor:
        """Branch B (§3.4): attention on band-filtered q/k/v, in float32."""
        B, L, D = q.shape
        if self.filter_time:
            band = self.band[None, :, None]
            q = torch.fft.irfft(qf * band, n=L, dim=1)
            k = torch.fft.irfft(kf * band, n=L, dim=1)
            v = torch.fft.irfft(torch.fft.rfft(v.float(), dim=1) * band, n=L, dim=1)
        qh, kh, vh = (
            t.float().view(B, L, self.n_heads, self.head_size).transpose(1, 2) for t in (q, k, v)
        )  # (B, H, L, E)
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(self.head_size) + mask
        probs = dropout(scores.softmax(dim=-1), self.attn_dropout, self.training)
        return (probs @ vh).transpose(1, 2).reshape(B, L, D)


class FEABlock(nn.Module):
    def __init__(self, c: FEARecConfig, max_seq_len: int, layer: int) -> None:
        super().__init__()
        self.hybrid_attention = HybridAttention(c, max_seq_len, layer)
        self.feed_forward = FeedForward(
            c.hidden_size, c.inner_size, c.hidden_dropout, c.layer_norm_eps
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.hybrid_attention(x, mask))


class FEAEncoder(nn.Module):
    def __init__(self, c: FEARecConfig, max_seq_len: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(FEABlock(c, max_seq_len, i) for i in range(c.n_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = block(x, mask)
        return x


class FEARec(SequentialBase):
    """Example::

    model = FEARec(FEARecConfig(contrast="us_x", global_ratio=0.6), n_items=12101, max_seq_len=50)
    seq_repr = model(item_seq, seq_len)  # (B, 64)
    """

    def __init__(self, config: FEARecConfig, n_items: int, max_seq_len: int) -> None:
        c = config
        c.check_length(max_seq_len)
        super().__init__(
            n_items + 1, max_seq_len, c.hidden_size, c.hidden_dropout, c.layer_norm_eps
        )
        self.config, self.n_items = config, n_items
        self.item_encoder = FEAEncoder(c, max_seq_len)
        self.apply(lambda m: init_weights(m, c.initializer_range))

    @property
    def needs_partner(self) -> bool:
        """Whether training batches must carry a same-target partner (``pos_seq``)."""
        return self.config.contrast in ("su", "us", "us_x")

    def forward(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = causal_padding_mask(item_seq) if self.config.dual_domain else None
        hidden = self.item_encoder(self.embed(item_seq), mask)
        return gather_last(hidden, lengths)  # (B, D)


def loss_terms(model: torch.nn.Module, batch: dict[str, torch.Tensor], gather=None) -> dict:
    """L_rec + the contrastive terms of ``contrast`` (+ the frequency regulariser), §5.3-5.5.

    Batch: ``item_seq`` (B, L), ``seq_len`` (B,), ``target`` (B,), and ``pos_seq``/``pos_len``
    (the same-target partner) when the contrast uses it.
    """
    m = getattr(model, "module", model)
    c = m.config
    seq, lens = batch["item_seq"], batch["seq_len"]
    u = model(seq, lens)
    ce = ce_loss(m.item_scores(u), batch["target"])
    terms = {"ce": ce}
    total = ce
    views = {"u": u}
    if c.contrast in ("un", "us", "us_x"):
        views["u2"] = model(seq, lens)  # second dropout view of the same input
    if c.contrast in ("su", "us", "us_x"):
        views["pos"] = model(batch["pos_seq"], batch["pos_len"])
    if c.contrast != "none":
        pairs = {
            "un": [("u", "u2", c.lmd)],
            "su": [("u", "pos", c.lmd_sem)],
            "us": [("u", "u2", c.lmd), ("u", "pos", c.lmd_sem)],
            "us_x": [("u2", "pos", c.lmd_sem)],
        }[c.contrast]
        nce = sum(w * info_nce(views[a], views[b], c.tau, c.sim, gather) for a, b, w in pairs)
        terms["nce"] = nce
        total = total + nce
    if c.contrast == "us_x" and c.freq_reg:
        pairs = {
            "un": [("u", "u2")],
            "su": [("u", "pos")],
            "us": [("u", "u2"), ("u", "pos")],
            "us_x": [("u2", "pos")],
        }[c.freq_reg_pairs]
        freq = sum(FREQ_REG_WEIGHT * freq_distance(views[a], views[b]) for a, b in pairs)
        terms["freq"] = freq
        total = total + freq
    return {"loss": total, **{k: v.detach() for k, v in terms.items()}}


def full_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    m = getattr(model, "module", model)
    return m.item_scores(m(batch["item_seq"], batch["seq_len"]))


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
PRESETS["fearec_paper"] = PRESETS["fearec_official"] | {"freq_reg": True, "freq_reg_pairs": "us_x"}
