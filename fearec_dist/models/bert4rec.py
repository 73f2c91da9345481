"""BERT4Rec (Sun et al., CIKM 2019) as RecBole 1.2.1 implements it (spec/baselines.md, BERT4Rec).

Shapes: B batch, L max_seq_len, D hidden size, K = int(mask_ratio · L) label slots,
V = n_items + 1 scored rows (padding 0 and the items), M = n_items + 1 the mask token id.

The item table has n_items + 2 rows: padding 0, items 1..n_items and the [MASK] token
M = n_items + 1 (RecBole's ``mask_token = n_items`` with its padding-inclusive ``n_items``). A
bidirectional encoder (key-padding mask only; the mask token counts as a real key) feeds the
output head ``O = LN(GELU(H W + b))``; scores are ``O · E_item[0..V-1]ᵀ + output_bias`` (the
mask row is never a class).

Training (`mask_item_seq`, inside `loss_terms`, torch RNG, vectorised): with probability
``ft_ratio``, drawn once per batch, every row masks its last history item ("last" mode);
otherwise every real position is masked independently with probability ``mask_ratio``. Only
the last K masked positions of a row get a label slot; the CE is averaged over slots whose
position index is > 0 (RecBole's test, see pitfall 1). The sample's ``target`` is not used.

Prediction (`build_eval_input`): RecBole's ``reconstruct_test_data`` appends a padding column,
writes M at index ``len`` and drops the first column, so the input is
``s[1..len-1] + [M]`` and the state at ``len - 1`` (the mask) scores the next item. The first
history item is dropped even when the row has room (pitfall 4; ``keep_first_item`` fixes it).

Pitfall flags (baselines.md, "Pitfalls"), all off by default so the defaults are RecBole's:
``train_position_zero`` (1), ``guard_empty_batch`` (2), ``keep_first_item`` (4). Pitfall 3 is
the data layer's prefix augmentation; pitfall 5 does not arise (eval batches are not masked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fearec_dist.config import ConfigError
from fearec_dist.models.layers import (
    SequentialBase,
    TransformerConfig,
    TransformerEncoder,
    at_least_float32,
    padding_mask,
)
from fearec_dist.models.spec import ModelSpec, scores_against


@dataclass
class BERT4RecConfig(TransformerConfig):
    hidden_dropout: float = 0.2  # RecBole's BERT4Rec.yaml
    attn_dropout: float = 0.2
    mask_ratio: float = 0.2  # per-position mask probability; K = int(mask_ratio · L) slots
    ft_ratio: float = 0.5  # probability that a batch masks only each row's last item
    train_position_zero: bool = False  # pitfall 1: also train a masked position 0
    guard_empty_batch: bool = False  # pitfall 2: loss 0 (not NaN) when no slot is labelled
    keep_first_item: bool = False  # pitfall 4: at prediction, keep s[0] when len < L

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.mask_ratio <= 1.0:
            raise ConfigError(f"model.mask_ratio: must be in (0, 1], got {self.mask_ratio}")
        if not 0.0 <= self.ft_ratio <= 1.0:
            raise ConfigError(f"model.ft_ratio: must be in [0, 1], got {self.ft_ratio}")

    def check_length(self, max_seq_len: int) -> None:
        # RecBole pads labels to K with ``seq[-K:]``; K = 0 would silently keep every slot
        if int(self.mask_ratio * max_seq_len) < 1:
            raise ConfigError(
                f"model.mask_ratio: int(mask_ratio · max_seq_len) = "
                f"int({self.mask_ratio} · {max_seq_len}) is 0; no label slot would be kept"
            )


def mask_item_seq(
    item_seq: torch.Tensor,
    seq_len: torch.Tensor,
    mask_id: int,
    mask_ratio: float,
    ft_ratio: float,
    n_slots: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RecBole's ``MaskItemSequence`` for one training batch, vectorised with torch RNG.

    Args:
        item_seq: (B, L) right-padded histories; seq_len: (B,) their lengths (>= 1).
        mask_id: the [MASK] token id. mask_ratio: per-position probability (random mode).
        ft_ratio: probability that the whole batch is in "last" mode (one draw per batch).
        n_slots: K, label slots per row.

    Returns:
        ``masked`` (B, L) the input; ``labels`` (B, K) the original items; ``index`` (B, K) their
        positions. Slots are left-padded with 0 and hold the last K masked positions in order.
    """
    B, L = item_seq.shape
    dev = item_seq.device
    rows = torch.arange(B, device=dev)
    # random mode: positions before the first 0 (RecBole walks until it meets padding)
    real = (item_seq > 0).cumprod(dim=1).bool()
    chosen = real & (torch.rand(B, L, device=dev) < mask_ratio)  # (B, L)
    rank = chosen.flip(1).cumsum(1).flip(1)  # (B, L) 1 at the last masked position, 2 before …
    keep = chosen & (rank <= n_slots)
    b, t = keep.nonzero(as_tuple=True)
    slot = n_slots - rank[b, t]  # the last masked position goes to slot K - 1
    rand_labels = torch.zeros(B, n_slots, dtype=item_seq.dtype, device=dev)
    rand_index = torch.zeros_like(rand_labels)
    rand_labels[b, slot] = item_seq[b, t]
    rand_index[b, slot] = t
    rand_masked = item_seq.masked_fill(chosen, mask_id)
    # "last" mode: position len - 1 of every row
    last_pos = seq_len - 1
    last_masked = item_seq.clone()
    last_masked[rows, last_pos] = mask_id
    last_labels = torch.zeros_like(rand_labels)
    last_index = torch.zeros_like(rand_labels)
    last_labels[:, -1] = item_seq[rows, last_pos]
    last_index[:, -1] = last_pos
    # one draw per batch, selected on the device (no host sync)
    last = torch.rand((), device=dev) < ft_ratio
    return (
        torch.where(last, last_masked, rand_masked),
        torch.where(last, last_labels, rand_labels),
        torch.where(last, last_index, rand_index),
    )


def build_eval_input(
    item_seq: torch.Tensor, seq_len: torch.Tensor, mask_id: int, keep_first_item: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prediction input and the position of its mask token.

    RecBole's ``reconstruct_test_data``: ``[s, 0]`` with M written at index len, first column
    dropped, i.e. ``s[1..len-1] + [M]`` left-aligned, read at len - 1. With
    ``keep_first_item`` a row with len < L keeps s[0] and gets M at len instead.

    Args:
        item_seq: (B, L) right-padded histories; seq_len: (B,) lengths in 1..L.

    Returns:
        ``input`` (B, L) and ``mask_pos`` (B,).
    """
    B, L = item_seq.shape
    rows = torch.arange(B, device=item_seq.device)
    ext = torch.cat([item_seq, item_seq.new_zeros(B, 1)], dim=1)  # (B, L + 1)
    ext[rows, seq_len] = mask_id
    dropped = ext[:, 1:]  # (B, L)
    if not keep_first_item:
        return dropped, seq_len - 1
    full = seq_len >= L  # only these rows must drop s[0] to make room
    return torch.where(full[:, None], dropped, ext[:, :L]), torch.where(full, seq_len - 1, seq_len)


class BERT4Rec(SequentialBase):
    """BERT4Rec over ``n_items`` real items (table rows: padding 0, items, mask n_items + 1).

    Example::

    model = BERT4Rec(BERT4RecConfig(), n_items=1682, max_seq_len=50)
    seq_repr = model(item_seq, seq_len)  # (B, 64) at the appended mask token
    """

    def __init__(self, config: BERT4RecConfig, n_items: int, max_seq_len: int) -> None:
        c = config
        c.check_length(max_seq_len)
        super().__init__(
            n_items + 2, max_seq_len, c.hidden_size, c.hidden_dropout, c.layer_norm_eps
        )
        self.config, self.n_items = config, n_items
        self.mask_id = n_items + 1
        self.n_slots = int(c.mask_ratio * max_seq_len)  # K
        self.trm_encoder = TransformerEncoder.from_config(c)
        self.output_ffn = nn.Linear(c.hidden_size, c.hidden_size)
        self.output_gelu = nn.GELU()
        self.output_ln = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.init_parameters()
        # a plain parameter outside init_weights (RecBole: zeros, one entry per scored row)
        self.output_bias = nn.Parameter(torch.zeros(n_items + 1))

    def encode(self, item_seq: torch.Tensor) -> torch.Tensor:
        """(B, L) input (mask tokens included) -> O (B, L, D) after the output head."""
        hidden = self.trm_encoder(self.embed(item_seq), padding_mask(item_seq))
        return self.output_ln(self.output_gelu(self.output_ffn(hidden)))

    def forward(
        self,
        item_seq: torch.Tensor,
        seq_len: torch.Tensor,
        label_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prediction (``label_index`` None): ``item_seq`` (B, L) is the raw history; returns
        (B, D) at the appended mask. Training: ``item_seq`` is already masked; returns
        (B, K, D) gathered at ``label_index`` (B, K)."""
        if label_index is None:
            inp, pos = build_eval_input(
                item_seq, seq_len, self.mask_id, self.config.keep_first_item
            )
            out = self.encode(inp)  # (B, L, D)
            return out[torch.arange(out.shape[0], device=out.device), pos]  # (B, D)
        out = self.encode(item_seq)
        idx = label_index[..., None].expand(-1, -1, out.shape[-1])  # (B, K, D)
        return out.gather(1, idx)

    def item_scores(self, seq_repr: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., V) logits: padding and items, plus ``output_bias``; no mask row."""
        return scores_against(seq_repr, *item_table(self))


def loss_terms(
    model: BERT4Rec, batch: dict[str, torch.Tensor], gather=None, forward=None, softmax=None
) -> dict[str, torch.Tensor]:
    """Masked-item CE (baselines.md, BERT4Rec). ``gather`` is unused; ``target`` is not read.

    Args:
        model: the bare BERT4Rec; ``forward``: the forward with gradient sync (DDP), default
            ``model``. batch: ``item_seq`` (B, L), ``seq_len`` (B,).
        softmax: this step's sampled softmax, or None for the full CE. Its in-batch candidates
            are the labelled slots' items; their logQ correction uses the next-item target
            counts, which slot labels only approximately follow (see ``softmax.py``).

    Returns:
        ``{"loss": ce, "ce": ce.detach()}``: CE summed over labelled slots / their count.
    """
    c: BERT4RecConfig = model.config
    masked, labels, index = mask_item_seq(
        batch["item_seq"], batch["seq_len"], model.mask_id, c.mask_ratio, c.ft_ratio, model.n_slots
    )
    forward = model if forward is None else forward  # not `or`: a compiled module has no bool()
    out = forward(masked, batch["seq_len"], index)  # (B, K, D)
    valid = ((labels > 0) if c.train_position_zero else (index > 0)).flatten()  # (B·K,)
    if softmax is None:
        logits = at_least_float32(model.item_scores(out))  # (B, K, V)
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    else:  # the labelled slots' items are the in-batch candidates
        emb, flat = model.item_embedding, labels.flatten()
        ce = softmax.loss(
            out.flatten(0, 1), flat, emb.weight, model.output_bias, sparse=emb.sparse,
            reduction="none", valid=valid & (flat > 0),
        )  # fmt: skip
    valid = valid.to(ce.dtype)
    denom = valid.sum().clamp(min=1.0) if c.guard_empty_batch else valid.sum()
    loss = (ce * valid).sum() / denom
    return {"loss": loss, "ce": loss.detach()}


def item_table(model: BERT4Rec) -> tuple[torch.Tensor, torch.Tensor]:
    """The padding and item rows of the tied table (no mask row) and ``output_bias``."""
    return model.item_embedding.weight[: model.n_items + 1], model.output_bias


SPEC = ModelSpec(
    config_cls=BERT4RecConfig, model_cls=BERT4Rec, loss_terms=loss_terms, item_table=item_table
)

full_scores = SPEC.full_scores  # (B, V) scores; DESIGN.md: every model module exposes it
