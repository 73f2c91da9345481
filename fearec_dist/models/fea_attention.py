"""FEARec's frequency-enhanced hybrid attention (spec/fearec.md §3): the band of rfft bins each
layer keeps, the delay aggregation of Branch A and ``HybridAttention`` itself.

Shapes: B batch, L max_seq_len, D hidden size, H heads, E = D / H, F = L // 2 + 1 rfft bins,
k delays. The model around it (config, encoder, losses, spec) is ``fearec.py``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fearec_dist.models.layers import (
    Dropout,
    at_least_float32,
    dropout,
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
