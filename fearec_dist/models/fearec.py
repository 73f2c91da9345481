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
from dataclasses import dataclass

import torch
from torch import nn

from fearec_dist.config import ConfigError
from fearec_dist.models.fea_attention import HybridAttention, layer_band, topk_count
from fearec_dist.models.layers import (
    FeedForward,
    SequentialBase,
    TransformerConfig,
    causal_padding_mask,
    gather_last,
)
from fearec_dist.models.losses import Candidates, freq_distance
from fearec_dist.models.softmax import next_item_ce
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
    model: FEARec, batch: dict[str, torch.Tensor], gather=None, forward=None, softmax=None
) -> dict[str, torch.Tensor]:
    """L = ce + lmd·nce + lmd_sem·nce_sem + 0.1·freq for the config's ``contrast`` (§5.3-5.5).

    Args:
        model: the bare FEARec; ``forward``: the forward with gradient sync (the trainer's DDP
            wrapper, so DDP's hooks fire), default ``model``.
        batch: ``item_seq`` (B, L), ``seq_len`` (B,), ``target`` (B,); ``pos_seq`` (B, L) and
            ``pos_len`` (B,), the same-target partner, when ``needs_partner``.
        gather: cross-worker gather for the InfoNCE candidates (see losses.py), or None.
        softmax: this step's sampled softmax for the ``ce`` term (``softmax.StepSoftmax``), or
            None for the full CE over every item (the reference).

    Returns:
        ``loss`` (the weighted total) and the unweighted terms present: ``ce``, ``nce``,
        ``nce_sem``, ``freq``. Each is a mean over this worker's rows.
    """
    c: FEARecConfig = model.config
    forward = model if forward is None else forward  # a compiled module has no truth value
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
    terms = {"ce": next_item_ce(model, views["u"], batch["target"], softmax)}
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
