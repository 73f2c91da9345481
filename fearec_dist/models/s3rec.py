"""S3-Rec (Zhou et al., CIKM 2020) as RecBole 1.2.1 implements it (spec/s3rec.md).

Shapes: B batch, L max_seq_len, D hidden size, A n_attributes, W attributes per item (table
width), V' = n_items + 2 item-table rows (padding 0, items, [MASK] = n_items + 1).

Two stages on one model. **Pretrain** (`pretrain_loss_terms`): four self-supervised objectives
on a bidirectional encoder (§4): AAP (attributes of unmasked items), MIP (masked item vs a
negative), MAP (attributes of masked items) and SP (a masked segment vs a negative segment), all
*sums* over positions / rows, not means (pitfall 6). **Finetune** (`loss_terms`): causal
encoder, state at len - 1, CE over all V' rows (the mask row is a training class, §5; it is
dropped from `full_scores`). A finetune run starts from `load_pretrained(model,
encoder_state_dict(pretrained))`.

The pretraining batch (§3) is built on the device with torch RNG (`build_pretrain_batch`),
vectorised instead of RecBole's per-row Python loop; the distributions are RecBole's: each real
position masked with probability ``mask_ratio``, its negative uniform over 1..V'-1 (the mask id
included, pitfall 4) redrawn while it is in the history; segment length U{1..⌊m/2⌋}, start
U{0..m-ℓ}, negative segment from the batch's concatenated histories. Where the spec leaves a
choice we follow RecBole 1.2.1: pretraining inputs are left-padded (``pretrain_padding="left"``,
SP reads position L - 1) while finetuning is right-padded like every model here (pitfall 1);
``pretrain_padding="right"`` uses one convention for both stages.

Attributes arrive as the constructor's ``item_attributes``: an integer (n_items + 1, W) table of
ids 1..A (0 = padding), or a bool/float (n_items + 1, A) multi-hot. Ids are shifted to columns
0..A-1, so a missing value never sets the last attribute (pitfall 3). The table is a
non-persistent buffer: state dicts hold RecBole's keys only.
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
    causal_padding_mask,
    gather_last,
    padding_mask,
)
from fearec_dist.models.softmax import next_item_ce
from fearec_dist.models.spec import ModelSpec

HEADS = ("aap_norm", "mip_norm", "map_norm", "sp_norm")
IDLE_IN_FINETUNE = ("feature_embedding", *HEADS)


@dataclass
class S3RecConfig(TransformerConfig):
    n_attributes: int = 0  # A; 0 = the largest id in item_attributes
    mask_ratio: float = 0.2  # per-position mask probability in pretraining
    aap_weight: float = 0.2  # RecBole yaml and original code (the doc page's 1.0 is wrong)
    mip_weight: float = 1.0
    map_weight: float = 1.0
    sp_weight: float = 0.5
    pretrain_padding: str = "left"  # "left" = RecBole; "right" = the finetune convention

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pretrain_padding not in ("left", "right"):
            raise ConfigError(
                f"model.pretrain_padding: must be 'left' or 'right', got {self.pretrain_padding!r}"
            )
        if not 0.0 < self.mask_ratio <= 1.0:
            raise ConfigError(f"model.mask_ratio: must be in (0, 1], got {self.mask_ratio}")
        if self.n_attributes < 0:
            raise ConfigError(f"model.n_attributes: must be >= 0, got {self.n_attributes}")


def attribute_id_table(item_attributes: torch.Tensor) -> torch.Tensor:
    """(N, W) ids 1..A (0 = padding) or (N, A) bool/float multi-hot -> (N, W') long ids."""
    if item_attributes.dtype.is_floating_point or item_attributes.dtype == torch.bool:
        hot = item_attributes != 0  # (N, A)
        ids = torch.arange(1, hot.shape[1] + 1) * hot  # (N, A), 0 where absent
        width = max(int(hot.sum(1).max()), 1)
        return ids.sort(dim=1, descending=True).values[:, :width]  # (N, W')
    return item_attributes.long()


def to_left_padding(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, L) right-padded -> left-padded: row b shifted right by L - lengths[b]."""
    L = x.shape[1]
    src = torch.arange(L, device=x.device) - (L - lengths)[:, None]  # (B, L)
    return x.gather(1, src.clamp(min=0)) * (src >= 0)


def sample_negatives(item_seq: torch.Tensor, n_max: int, tries: int = 100) -> torch.Tensor:
    """(B, L) ids uniform over 1..n_max, redrawn (up to ``tries`` times) while in the row."""
    neg = torch.randint(1, n_max + 1, item_seq.shape, device=item_seq.device)
    for _ in range(tries):
        clash = (neg[:, :, None] == item_seq[:, None, :]).any(-1)  # (B, L)
        if not clash.any():
            break
        neg = torch.where(clash, torch.randint_like(neg, 1, n_max + 1), neg)
    return neg


def build_pretrain_batch(
    item_seq: torch.Tensor,
    seq_len: torch.Tensor,
    mask_id: int,
    mask_ratio: float,
    left_pad: bool = True,
) -> dict[str, torch.Tensor]:
    """RecBole's ``reconstruct_pretrain_data`` (§3), vectorised with torch RNG.

    Args:
        item_seq: (B, L) right-padded histories (the target is not used); seq_len: (B,) >= 1.
        mask_id: the [MASK] id (= n_items + 1, also the largest negative id).
        mask_ratio: per-position mask probability. left_pad: RecBole's left-padded layout.

    Returns:
        (B, L) long tensors ``masked``, ``pos`` (the original), ``neg`` (negatives at masked
        positions, the original elsewhere), ``masked_seg``, ``pos_seg``, ``neg_seg``; and
        ``last`` (B,), the position of each row's last token (L - 1 when left-padded).
    """
    B, L = item_seq.shape
    dev = item_seq.device
    t = torch.arange(L, device=dev)
    real = t < seq_len[:, None]  # (B, L)
    x = item_seq * real
    chosen = real & (torch.rand(B, L, device=dev) < mask_ratio)
    masked = x.masked_fill(chosen, mask_id)
    neg = torch.where(chosen, sample_negatives(x, mask_id), x)
    # segment prediction: ℓ ~ U{1..⌊m/2⌋}, a ~ U{0..m-ℓ}, a' ~ U{0..T-ℓ} (T = Σ m)
    long = x[real]  # (T,) the batch's histories concatenated in row order
    ell = (torch.rand(B, device=dev) * (seq_len // 2)).long() + 1
    start = (torch.rand(B, device=dev) * (seq_len - ell + 1)).long()
    start_neg = (torch.rand(B, device=dev) * (long.numel() - ell + 1)).long()
    on = (seq_len >= 2)[:, None]  # rows with m < 2 use x for all three
    in_seg = on & (t >= start[:, None]) & (t < (start + ell)[:, None])  # (B, L)
    outside = real.long() * mask_id  # mask at real positions outside the segment, 0 after m
    src = (start_neg[:, None] + t - start[:, None]).clamp(0, long.numel() - 1)  # (B, L)
    out = {
        "masked": masked,
        "pos": x,
        "neg": neg,
        "masked_seg": x.masked_fill(in_seg, mask_id),
        "pos_seg": torch.where(on, torch.where(in_seg, x, outside), x),
        "neg_seg": torch.where(on, torch.where(in_seg, long[src], outside), x),
    }
    if left_pad:
        out = {k: to_left_padding(v, seq_len) for k, v in out.items()}
        out["last"] = torch.full_like(seq_len, L - 1)
    else:
        out["last"] = seq_len - 1
    return out


class S3Rec(SequentialBase):
    """S3-Rec over ``n_items`` real items, with an optional item-attribute table.

    Example::

    model = S3Rec(S3RecConfig(stage="pretrain"), n_items=1682, max_seq_len=50,
                  item_attributes=table)  # (1683, W) ids 1..A
    terms = pretrain_loss_terms(model, batch)  # later: load_pretrained(finetune_model, ...)
    """

    def __init__(
        self,
        config: S3RecConfig,
        n_items: int,
        max_seq_len: int,
        item_attributes: torch.Tensor | None = None,
    ) -> None:
        c = config
        super().__init__(
            n_items + 2, max_seq_len, c.hidden_size, c.hidden_dropout, c.layer_norm_eps
        )
        self.config, self.n_items, self.mask_id = config, n_items, n_items + 1
        n_attributes = c.n_attributes
        if item_attributes is not None:
            ids = attribute_id_table(item_attributes)
            if ids.shape[0] != n_items + 1:
                raise ConfigError(
                    f"S3Rec item_attributes: expected n_items + 1 = {n_items + 1} rows "
                    f"(row 0 = padding), got {ids.shape[0]}"
                )
            n_attributes = n_attributes or int(ids.max())
            if int(ids.max()) > n_attributes:
                raise ConfigError(
                    f"model.n_attributes: {n_attributes}, but item_attributes has id {ids.max()}"
                )
            self.register_buffer("attribute_ids", ids, persistent=False)  # (n_items + 1, W)
        else:
            self.register_buffer("attribute_ids", None, persistent=False)
        self.n_attributes = n_attributes
        self.trm_encoder = TransformerEncoder.from_config(c)
        # declared with padding_idx 0 like RecBole, but only .weight is used: row 0 trains
        self.feature_embedding = (
            nn.Embedding(n_attributes, c.hidden_size, padding_idx=0) if n_attributes else None
        )
        for name in HEADS:
            setattr(self, name, nn.Linear(c.hidden_size, c.hidden_size))
        self.init_parameters()

    def attribute_targets(
        self, items: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """(B, L) item ids -> (B, L, A) multi-hot of their attributes (0 for padding)."""
        ids = self.attribute_ids[items]  # (B, L, W)
        hot = torch.zeros(*items.shape, self.n_attributes + 1, dtype=dtype, device=items.device)
        return hot.scatter_(-1, ids, 1.0)[..., 1:]  # (B, L, A): id j -> column j - 1

    def forward(
        self, item_seq: torch.Tensor, lengths: torch.Tensor | None, pretrain: bool = False
    ) -> torch.Tensor:
        """Finetune: causal encoder, (B, L) right-padded -> (B, D) at len - 1. Pretrain
        (``pretrain=True``, ``lengths`` unused): bidirectional states (B, L, D)."""
        mask = padding_mask(item_seq) if pretrain else causal_padding_mask(item_seq)
        hidden = self.trm_encoder(self.embed(item_seq), mask)  # (B, L, D)
        return hidden if pretrain else gather_last(hidden, lengths)


def missing_attributes_message() -> str:
    return (
        "S3Rec pretraining needs item attributes, and none were given: pass the item-attribute "
        "table as item_attributes (build_model('s3rec', ..., _item_attributes=table), a "
        "(n_items + 1, W) long tensor of ids 1..A; the data layer writes it as "
        "attributes.parquet when the dataset is prepared with attributes)"
    )


def pretrain_objectives(
    model: S3Rec, parts: dict[str, torch.Tensor], forward=None
) -> dict[str, torch.Tensor]:
    """The four §4 sums for a built pretraining batch (see `build_pretrain_batch`).

    One encoder call on the stacked (4B, L) inputs [masked; masked_seg; pos_seg; neg_seg]
    (one DDP forward; dropout masks are still independent per row).

    Returns:
        ``aap``, ``mip``, ``map``, ``sp``: unweighted sums (scalars).
    """
    masked, pos, neg = parts["masked"], parts["pos"], parts["neg"]
    B = masked.shape[0]
    stacked = torch.cat([masked, parts["masked_seg"], parts["pos_seg"], parts["neg_seg"]])
    forward = model if forward is None else forward  # not `or`: a compiled module has no bool()
    hidden = at_least_float32(forward(stacked, None, pretrain=True))  # (4B, L, D)
    h = hidden[:B]  # (B, L, D)
    w_attr = model.feature_embedding.weight  # (A, D)
    features = model.attribute_targets(pos, h.dtype)  # (B, L, A)
    is_mask = masked == model.mask_id
    unmasked = ~is_mask & (masked != 0)

    def attr_bce(head: nn.Module) -> torch.Tensor:  # (B, L) summed over attributes
        logits = head(h) @ w_attr.T  # (B, L, A)
        return F.binary_cross_entropy_with_logits(logits, features, reduction="none").sum(-1)

    mip_h = model.mip_norm(h)  # (B, L, D)
    p_pos = ((mip_h * model.item_embedding(pos)).sum(-1)).sigmoid()  # (B, L)
    p_neg = ((mip_h * model.item_embedding(neg)).sum(-1)).sigmoid()
    rows = torch.arange(B, device=masked.device)
    ctx, g_pos, g_neg = (hidden[i * B : (i + 1) * B][rows, parts["last"]] for i in (1, 2, 3))
    sp_ctx = model.sp_norm(ctx)  # (B, D)
    q_pos = (sp_ctx * g_pos).sum(-1).sigmoid()  # (B,)
    q_neg = (sp_ctx * g_neg).sum(-1).sigmoid()
    return {
        "aap": (attr_bce(model.aap_norm) * unmasked).sum(),
        "mip": (F.softplus(p_neg - p_pos) * is_mask).sum(),  # -log σ(p⁺ - p⁻)
        "map": (attr_bce(model.map_norm) * is_mask).sum(),
        "sp": F.softplus(q_neg - q_pos).sum(),
    }


def pretrain_loss_terms(
    model: S3Rec, batch: dict[str, torch.Tensor], gather=None, forward=None, softmax=None
) -> dict[str, torch.Tensor]:
    """L_pre = aap_weight·AAP + mip_weight·MIP + map_weight·MAP + sp_weight·SP (§4).

    Args:
        model: the bare S3Rec, with item attributes; ``forward``: the forward with gradient sync
            (DDP), default ``model``. batch: ``item_seq`` (B, L) right-padded, ``seq_len`` (B,);
            ``target`` is not used. ``gather`` is unused.

    Returns:
        ``loss`` (the weighted sum) and the detached sums ``aap``, ``mip``, ``map``, ``sp``.
    """
    c: S3RecConfig = model.config
    if model.attribute_ids is None:
        raise ConfigError(missing_attributes_message())
    parts = build_pretrain_batch(
        batch["item_seq"],
        batch["seq_len"],
        model.mask_id,
        c.mask_ratio,
        c.pretrain_padding == "left",
    )
    terms = pretrain_objectives(model, parts, forward)
    weights = {"aap": c.aap_weight, "mip": c.mip_weight, "map": c.map_weight, "sp": c.sp_weight}
    total = sum(weights[k] * v for k, v in terms.items())
    return {"loss": total, **{k: v.detach() for k, v in terms.items()}}


def loss_terms(
    model: S3Rec, batch: dict[str, torch.Tensor], gather=None, forward=None, softmax=None
) -> dict[str, torch.Tensor]:
    """Finetune: CE over all V' rows, the mask row included as in RecBole (§5).

    Args:
        model: the bare S3Rec; ``forward``: the forward with gradient sync (DDP), default
            ``model``. batch: ``item_seq`` (B, L), ``seq_len`` (B,), ``target`` (B,). ``gather``
            is unused.

    Returns:
        ``{"loss": ce, "ce": ce.detach()}``, the mean over this worker's rows.
    """
    forward = model if forward is None else forward  # not `or`: a compiled module has no bool()
    seq_repr = forward(batch["item_seq"], batch["seq_len"])  # (B, D)
    ce = next_item_ce(model, seq_repr, batch["target"], softmax)
    # the feature embedding and the four heads take no part in finetuning, but DDP (built
    # without find_unused_parameters) needs every parameter in the graph: add them with weight 0
    idle = [p.sum() for n, p in model.named_parameters() if n.split(".")[0] in IDLE_IN_FINETUNE]
    loss = ce + 0.0 * torch.stack(idle).sum() if idle else ce
    return {"loss": loss, "ce": ce.detach()}


def encoder_state_dict(model: S3Rec) -> dict[str, torch.Tensor]:
    """The pretrained weights to carry into finetuning: the whole model's state dict, as
    RecBole saves it (embeddings incl. the mask row, feature embedding, encoder, heads)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_pretrained(model: S3Rec, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Loads a pretrained S3Rec state dict into ``model`` (the finetune start, §5).

    RecBole loads strictly. Here every key of the model must be present with the same shape
    (a different dataset or attribute vocabulary fails here, pitfall 7), except that a model
    built without attributes skips ``feature_embedding.weight``.

    Returns:
        The keys loaded.

    Raises:
        ConfigError: naming the missing, unexpected or mis-shaped key.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own) - {"feature_embedding.weight"})
    if missing or unexpected:
        raise ConfigError(
            f"S3Rec load_pretrained: not an S3Rec state dict for this model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for key, value in own.items():
        if state_dict[key].shape != value.shape:
            raise ConfigError(
                f"S3Rec load_pretrained: {key} has shape {tuple(state_dict[key].shape)} in the "
                f"pretrained state, {tuple(value.shape)} here: pretrain and finetune must use "
                "the same dataset, max_seq_len, hidden size and attribute vocabulary"
            )
    model.load_state_dict({k: state_dict[k] for k in own})
    return sorted(own)


SPEC = ModelSpec(
    config_cls=S3RecConfig,
    model_cls=S3Rec,
    loss_terms=loss_terms,
    pretrain_loss_terms=pretrain_loss_terms,
    needs_attributes=True,
    load_pretrained=load_pretrained,
    removed_keys={
        "stage": "the stage is train.stage (the CLI's --stage pretrain|finetune); "
        "delete model.stage from the config"
    },
)

full_scores = SPEC.full_scores  # (B, V) scores; DESIGN.md: every model module exposes it
