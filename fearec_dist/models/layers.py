"""Transformer parts shared by every model (RecBole 1.2.1 `layers.py` semantics, spec/baselines.md).

Shapes: B batch, L max_seq_len, D hidden size, H heads, E = D / H head size, V = n_items + 1.

Sub-module names follow RecBole's (``query``, ``key``, ``value``, ``dense``, ``LayerNorm``,
``dense_1``, ``dense_2``) so RecBole checkpoints map onto them key for key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fearec_dist.config import ConfigError

MASK_VALUE = -10000.0  # RecBole's additive mask value (not -inf: fully padded rows stay finite)


@dataclass
class TransformerConfig:
    """The keys every model here shares (RecBole's names: docs/recbole-keys.md). Each model's
    config extends it; ``__post_init__`` checks these, the subclass's checks its own."""

    hidden_size: int = 64
    n_layers: int = 2
    n_heads: int = 2
    inner_size: int = 256  # FFN width
    hidden_dropout: float = 0.5  # embeddings, residual branches, FFN
    attn_dropout: float = 0.5  # attention probabilities
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.n_heads < 1 or self.hidden_size % self.n_heads:
            raise ConfigError(
                f"model.n_heads: hidden_size {self.hidden_size} is not a multiple of {self.n_heads}"
            )
        for key in ("hidden_size", "n_layers", "inner_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("hidden_dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key}: must be in [0, 1), got {getattr(self, key)}")


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32 if it is half/bfloat16 (autocast), else unchanged (float32/float64 kept)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """RecBole's init: Linear/Embedding ~ N(0, std²) (padding row included), bias 0, LN (1, 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=std)
    if isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


def dropout_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """A CPU dropout mask: 0 with probability p, else 1/(1-p), built from packed random bits.

    ``random_()`` on int32 gives 31 uniform bits per draw (one Mersenne-Twister call), so a mask
    element needs only b bits instead of one float draw: b = 1 for p = 0.5 (31 elements per draw),
    b <= 8 whenever p is a multiple of 1/256 (exact), b = 15 otherwise, with p rounded to the
    nearest multiple of 2^-15 (|error| <= 1.5e-5) and the survivors scaled by the rounded keep
    probability, so E[mask] = 1 exactly. Dropout's masks were about 45 % of a FEARec step on CPU
    (issue 5's profile); this mask costs about a tenth of ``F.dropout``'s.
    """
    bits = next((b for b in (1, 2, 4, 8) if (p * 2**b).is_integer()), 15)
    threshold = round(p * 2**bits)  # a field value < threshold drops the element
    n = math.prod(shape)
    lanes = 31 // bits  # b-bit fields per 31-bit draw
    draws = torch.empty((n + lanes - 1) // lanes, dtype=torch.int32).random_()
    shifts = torch.arange(0, lanes * bits, bits, dtype=torch.int32)
    field = (draws[:, None] >> shifts) & (2**bits - 1)  # (draws, lanes) uniform in [0, 2^b)
    keep = field.view(-1)[:n].view(shape) >= threshold
    return keep.to(dtype).mul_(2**bits / (2**bits - threshold))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout: ``F.dropout``'s semantics (fresh mask per call, survivors scaled by the
    keep probability, identity when not training), with the cheaper CPU mask of `dropout_mask`.
    CUDA keeps PyTorch's fused kernel."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    if x.device.type != "cpu" or round(p * 2**15) in (0, 2**15):
        return F.dropout(x, p, True)
    return x * dropout_mask(x.shape, p, x.dtype)


class Dropout(nn.Module):
    """``nn.Dropout`` with the cheaper CPU mask of `dropout` (same semantics)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def causal_padding_mask(item_seq: torch.Tensor) -> torch.Tensor:
    """Additive (B, 1, L, L) mask: 0 where key j <= query i and item_seq[b, j] > 0, else -10000."""
    L = item_seq.shape[1]
    allowed = (item_seq > 0)[:, None, None, :] & torch.ones(
        L, L, dtype=torch.bool, device=item_seq.device
    ).tril()
    return torch.zeros(allowed.shape, device=item_seq.device).masked_fill(~allowed, MASK_VALUE)


def padding_mask(item_seq: torch.Tensor) -> torch.Tensor:
    """Additive (B, 1, 1, L) bidirectional mask: 0 for real keys, -10000 for padding."""
    pad = (item_seq == 0)[:, None, None, :]
    return torch.zeros(pad.shape, device=item_seq.device).masked_fill(pad, MASK_VALUE)


def gather_last(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """hidden (B, L, D), lengths (B,) -> (B, D): the state at position len - 1 (right padding)."""
    idx = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, idx).squeeze(1)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    attn_dropout: float,
    training: bool,
) -> torch.Tensor:
    """Dropout(softmax(q kᵀ / √E + mask)) v.

    Args:
        q, k, v: (B, H, L, E).
        mask: additive, broadcastable to (B, H, L, L); float32, so under autocast the scores are
            promoted and -10000 and the softmax stay in float32 (spec fearec.md §10.14).
        attn_dropout: dropout probability on the attention probabilities.
        training: whether dropout is active.

    Returns:
        (B, H, L, E) context.
    """
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask  # (B, H, L, L)
    probs = dropout(scores.softmax(dim=-1), attn_dropout, training)
    return probs.to(v.dtype) @ v


class MultiHeadAttention(nn.Module):
    """softmax(QKᵀ/√E + M) V with dropout on the probabilities; Out = LN(X + Drop(C Wo))."""

    def __init__(
        self, hidden: int, n_heads: int, hidden_dropout: float, attn_dropout: float, eps: float
    ) -> None:
        super().__init__()
        if hidden % n_heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of n_heads {n_heads}")
        self.n_heads, self.head_size, self.attn_dropout = n_heads, hidden // n_heads, attn_dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.out_dropout = Dropout(hidden_dropout)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.head_size).transpose(1, 2)  # (B, H, L, E)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        ctx = attend(q, k, v, mask, self.attn_dropout, self.training)  # (B, H, L, E)
        ctx = ctx.transpose(1, 2).reshape(x.shape)  # (B, L, D)
        return self.LayerNorm(x + self.out_dropout(self.dense(ctx)))


class FeedForward(nn.Module):
    """LN(Y + Drop(W2 gelu(W1 Y))), gelu in its exact erf form."""

    def __init__(self, hidden: int, inner: int, dropout_p: float, eps: float) -> None:
        super().__init__()
        self.dense_1 = nn.Linear(hidden, inner)
        self.dense_2 = nn.Linear(inner, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = Dropout(dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(x + self.dropout(self.dense_2(F.gelu(self.dense_1(x)))))


class PostLNBlock(nn.Module):
    """One post-LN block (RecBole's ``TransformerLayer``): an attention sub-layer, then the
    feed-forward. ``context`` is what the attention takes besides ``x``: the attention mask
    (self-attention) or the position table (LightSANs' decoupled positions)."""

    def __init__(
        self, attention: nn.Module, hidden: int, inner: int, hidden_dropout: float, eps: float
    ) -> None:
        super().__init__()
        self.multi_head_attention = attention
        self.feed_forward = FeedForward(hidden, inner, hidden_dropout, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.multi_head_attention(x, context))


class BlockStack(nn.Module):
    """``n_layers`` blocks applied in turn, each with the same ``context``; returns the last
    layer's output (RecBole's encoders, ``output_all_encoded_layers=False``)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, context)
        return x


class TransformerEncoder(BlockStack):
    """``n_layers`` post-LN self-attention blocks (RecBole ``TransformerEncoder``)."""

    def __init__(
        self,
        n_layers: int,
        hidden: int,
        n_heads: int,
        inner: int,
        hidden_dropout: float,
        attn_dropout: float,
        eps: float,
    ) -> None:
        super().__init__(
            [
                PostLNBlock(
                    MultiHeadAttention(hidden, n_heads, hidden_dropout, attn_dropout, eps),
                    hidden,
                    inner,
                    hidden_dropout,
                    eps,
                )
                for _ in range(n_layers)
            ]
        )

    @classmethod
    def from_config(cls, c: TransformerConfig) -> TransformerEncoder:
        """The encoder a model's shared transformer keys describe."""
        return cls(
            c.n_layers,
            c.hidden_size,
            c.n_heads,
            c.inner_size,
            c.hidden_dropout,
            c.attn_dropout,
            c.layer_norm_eps,
        )


class SequentialBase(nn.Module):
    """Item + position embeddings, LayerNorm and dropout at the input (spec fearec.md §1).

    X0 = Drop(LN(E_item[s] + E_pos[0..L-1])); padding positions are not zeroed. The tables sit on
    the model itself, so state-dict keys are RecBole's (``item_embedding.weight``, …).
    """

    def __init__(
        self, n_rows: int, max_seq_len: int, hidden: int, dropout_p: float, eps: float
    ) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.item_embedding = nn.Embedding(n_rows, hidden, padding_idx=0)
        self.position_embedding = nn.Embedding(max_seq_len, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = Dropout(dropout_p)

    def init_parameters(self) -> None:
        """RecBole's init over every sub-module (``init_weights`` at ``initializer_range``);
        a model calls it at the end of its ``__init__``, once ``self.config`` is set."""
        self.apply(lambda module: init_weights(module, self.config.initializer_range))

    def embed(self, item_seq: torch.Tensor) -> torch.Tensor:
        pos = self.position_embedding.weight[: item_seq.shape[1]]  # (L, D)
        return self.dropout(self.LayerNorm(self.item_embedding(item_seq) + pos))

    def item_scores(self, seq_repr: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, V) logits against the tied item table (padding column included)."""
        return seq_repr @ self.item_embedding.weight.T
