"""LightSANs (Fan et al., SIGIR 2021) as RecBole 1.2.1 implements it (spec/lightsans.md).

Shapes: B batch, L max_seq_len, D hidden size, H heads, E = D / H head size, k = k_interests,
V = n_items + 1.

Low-rank decomposed self-attention: keys and values are pooled into k interests (§2 step 2),
every query attends to the k interests (step 4), and a decoupled, batch-independent position
attention G (L, L) mixes the un-aggregated values (step 5). The item branch costs O(B·L·k·D);
only the position branch is quadratic in L (spec pitfall 4). There is no causal and no padding
mask anywhere (§2): padding positions take part, as in the reference (pitfall 2).

Both softmaxes normalise over the query / sequence axis (dim -2), not over the keys (pitfall 1);
the interest matrices θ keep PyTorch's ``randn`` init, std 1 (pitfall 3). Sub-module names are
RecBole's (``attpooling_key``, ``pos_q_linear``, ``pos_ln``, …) so checkpoints map key for key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fearec_dist.config import ConfigError
from fearec_dist.models.layers import (
    BlockStack,
    Dropout,
    PostLNBlock,
    SequentialBase,
    TransformerConfig,
    dropout,
    gather_last,
)
from fearec_dist.models.softmax import next_item_ce
from fearec_dist.models.spec import ModelSpec


@dataclass
class LightSANsConfig(TransformerConfig):
    k_interests: int = 5  # latent interests; the RecBole yaml suggests about 0.1 · L
    attn_dropout: float = 0.5  # item-to-interest attention probabilities (not G)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k_interests < 1:
            raise ConfigError(f"model.k_interests: must be >= 1, got {self.k_interests}")


class ItemToInterestAggregation(nn.Module):
    """Agg(Z) = softmax_L(Z θ)ᵀ Z: k convex combinations of the L positions (§2 step 2)."""

    def __init__(self, hidden: int, k_interests: int) -> None:
        super().__init__()
        # RecBole passes seq_len too but never uses it (pitfall 5); θ ~ N(0, 1) (pitfall 3)
        self.theta = nn.Parameter(torch.randn(hidden, k_interests))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        weights = (z @ self.theta).softmax(dim=-2)  # (B, L, k), over the sequence axis
        return weights.transpose(1, 2) @ z  # (B, k, D)


class LightMultiHeadAttention(nn.Module):
    """C = softmax_{-2}(Q K̄ᵀ/√E) V̄ + softmax_{-2}(Pq Pkᵀ/√E) V; Out = LN(X + Drop(C Wo))."""

    def __init__(
        self,
        hidden: int,
        n_heads: int,
        k_interests: int,
        hidden_dropout: float,
        attn_dropout: float,
        eps: float,
    ) -> None:
        super().__init__()
        self.n_heads, self.head_size, self.attn_dropout = n_heads, hidden // n_heads, attn_dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attpooling_key = ItemToInterestAggregation(hidden, k_interests)
        self.attpooling_value = ItemToInterestAggregation(hidden, k_interests)
        self.pos_q_linear = nn.Linear(hidden, hidden)
        self.pos_k_linear = nn.Linear(hidden, hidden)
        self.pos_scaling = (2.0 * self.head_size) ** -0.5  # RecBole's attn_scale_factor = 2
        self.pos_ln = nn.LayerNorm(hidden, eps=eps)
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.out_dropout = Dropout(hidden_dropout)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        return x.view(n, t, self.n_heads, self.head_size).transpose(1, 2)  # (n, H, t, E)

    def position_attention(self, pos_emb: torch.Tensor) -> torch.Tensor:
        """(L, D) position table -> G (1, H, L, L), normalised over the query index (step 5)."""
        p = self.pos_ln(pos_emb)[None]  # (1, L, D)
        pq = self.split(self.pos_q_linear(p)) * self.pos_scaling  # (1, H, L, E)
        pk = self.split(self.pos_k_linear(p))  # (1, H, L, E)
        return (pq @ pk.transpose(-1, -2) / math.sqrt(self.head_size)).softmax(dim=-2)

    def mix_positions(self, g: torch.Tensor, v_full: torch.Tensor) -> torch.Tensor:
        """G (1, H, L, L) applied to the un-aggregated values (B, L, D) -> (B, H, L, E).

        ``g @ split(v)`` would broadcast G to (B, H, L, L) and copy it; folding B into the
        columns keeps G single (B·H·L²·E flops either way, spec pitfall 4)."""
        B, L, _ = v_full.shape
        v = v_full.view(B, L, self.n_heads, self.head_size).permute(2, 1, 0, 3)  # (H, L, B, E)
        ctx = g[0] @ v.reshape(self.n_heads, L, B * self.head_size)  # (H, L, B·E)
        return ctx.view(self.n_heads, L, B, self.head_size).permute(2, 0, 1, 3)  # (B, H, L, E)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        q = self.split(self.query(x))  # (B, H, L, E)
        v_full = self.value(x)  # (B, L, D)
        k_bar = self.split(self.attpooling_key(self.key(x)))  # (B, H, k, E)
        v_bar = self.split(self.attpooling_value(v_full))  # (B, H, k, E)
        scores = q @ k_bar.transpose(-1, -2) / math.sqrt(self.head_size)  # (B, H, L, k)
        probs = dropout(scores.softmax(dim=-2), self.attn_dropout, self.training)
        ctx = probs @ v_bar + self.mix_positions(self.position_attention(pos_emb), v_full)
        ctx = ctx.transpose(1, 2).reshape(x.shape)  # (B, L, D)
        return self.LayerNorm(x + self.out_dropout(self.dense(ctx)))


class LightSANs(SequentialBase):
    """LightSANs over ``n_items`` real items (item table n_items + 1 rows, row 0 = padding).

    Example::

    model = LightSANs(LightSANsConfig(k_interests=5), n_items=1682, max_seq_len=50)
    seq_repr = model(item_seq, seq_len)  # (B, 64)
    """

    def __init__(self, config: LightSANsConfig, n_items: int, max_seq_len: int) -> None:
        c = config
        super().__init__(
            n_items + 1, max_seq_len, c.hidden_size, c.hidden_dropout, c.layer_norm_eps
        )
        self.config, self.n_items = config, n_items
        # n_layers LightSANs blocks; each gets the raw position table (§2)
        self.trm_encoder = BlockStack(
            [
                PostLNBlock(
                    LightMultiHeadAttention(
                        c.hidden_size,
                        c.n_heads,
                        c.k_interests,
                        c.hidden_dropout,
                        c.attn_dropout,
                        c.layer_norm_eps,
                    ),
                    c.hidden_size,
                    c.inner_size,
                    c.hidden_dropout,
                    c.layer_norm_eps,
                )
                for _ in range(c.n_layers)
            ]
        )
        self.init_parameters()  # θ is a bare Parameter: it keeps its randn init

    def embed(self, item_seq: torch.Tensor) -> torch.Tensor:
        """X0 = Drop(LN(E_item[s])): no position at the input (§1); positions go to each layer."""
        return self.dropout(self.LayerNorm(self.item_embedding(item_seq)))

    def forward(self, item_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """item_seq (B, L) right-padded, lengths (B,) -> seq_repr (B, D) at position len - 1."""
        pos_emb = self.position_embedding.weight[: item_seq.shape[1]]  # (L, D), no dropout
        hidden = self.trm_encoder(self.embed(item_seq), pos_emb)  # (B, L, D)
        return gather_last(hidden, lengths)


def loss_terms(
    model: LightSANs, batch: dict[str, torch.Tensor], gather=None, forward=None, softmax=None
) -> dict[str, torch.Tensor]:
    """Full-softmax CE over all V rows (§3). ``gather`` is unused (no contrastive term).

    Args:
        model: the bare LightSANs; ``forward``: the forward with gradient sync (DDP), default
            ``model``. batch: ``item_seq`` (B, L), ``seq_len`` (B,), ``target`` (B,).

    Returns:
        ``{"loss": ce, "ce": ce.detach()}``, the mean over this worker's rows.
    """
    forward = model if forward is None else forward  # not `or`: a compiled module has no bool()
    seq_repr = forward(batch["item_seq"], batch["seq_len"])  # (B, D)
    ce = next_item_ce(model, seq_repr, batch["target"], softmax)
    return {"loss": ce, "ce": ce.detach()}


SPEC = ModelSpec(config_cls=LightSANsConfig, model_cls=LightSANs, loss_terms=loss_terms)

full_scores = SPEC.full_scores  # (B, V) scores; DESIGN.md: every model module exposes it
