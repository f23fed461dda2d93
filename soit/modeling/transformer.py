"""Deformable transformer with two-stage proposals and box refinement (docs/model.md, section 2).

Tensors are batch-first. Dimension names: N images, L levels, S = sum_l H_l * W_l flattened
tokens, Q queries, C channels. Boxes and reference points are (cx, cy, w, h) / (x, y)
normalized by each image's valid (unpadded) size, the box branches' convention; the valid
ratios convert them to the padded maps' coordinates in which the attention samples.

Shapes that vary with the input (level sizes, token counts) are read from tensor shapes
(``x.shape[i]`` and ``torch._shape_as_tensor``), never from tensor values, so that tracing
records them as graph inputs rather than constants.
"""
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from soit.layers import MSDeformAttn
from soit.layers.cpu_inference import apply_linear
from soit.layers.position_encoding import box_sine_embedding, inverse_sigmoid, sine_position_encoding, valid_extent

from .box_ops import apply_box_delta

__all__ = [
    "DeformableEncoderLayer",
    "DeformableEncoder",
    "DeformableDecoderLayer",
    "DeformableDecoder",
    "DeformableTransformer",
    "TooFewTokensError",
    "query_group_mask",
    "valid_ratios_from_mask",
    "encoder_reference_points",
    "flatten_spatial_shapes",
]


def valid_ratios_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool (True = pad) -> (N, 2) float (valid width / W, valid height / H)."""
    extent = valid_extent(mask)
    return torch.stack([extent[:, 0] / mask.shape[2], extent[:, 1] / mask.shape[1]], -1)


def encoder_reference_points(masks: Sequence[torch.Tensor], valid_ratios: torch.Tensor) -> torch.Tensor:
    """Pixel-centre reference points of every token, seen from every level.

    Args:
        masks: L tensors (N, H_l, W_l); only their shapes are used.
        valid_ratios: (N, L, 2).

    Returns:
        (N, S, L, 2) (x, y): a token's centre normalized by its own level's valid size, then
        multiplied by each level's valid ratio, i.e. the same image point in the coordinates
        that the attention uses for level l.
    """
    refs = []
    for lvl, m in enumerate(masks):
        h, w = m.shape[-2], m.shape[-1]
        ys = torch.arange(h, dtype=torch.float32, device=valid_ratios.device) + 0.5
        xs = torch.arange(w, dtype=torch.float32, device=valid_ratios.device) + 0.5
        ref_y = ys[:, None].expand(-1, w).reshape(1, -1) / (valid_ratios[:, None, lvl, 1] * h)
        ref_x = xs[None, :].expand(h, -1).reshape(1, -1) / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]


def flatten_spatial_shapes(features: Sequence[torch.Tensor]):
    """(L, 2) long (H_l, W_l) and (L,) long start offsets of each level in the flattened
    sequence, on the features' device; built from tensor shapes so tracing keeps them dynamic."""
    shapes = torch.stack([torch._shape_as_tensor(f)[-2:] for f in features]).to(features[0].device)
    start = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    return shapes, start


def query_group_mask(num_total, num_dn, dn_groups, num_one2one, device=None):
    """(num_total, num_total) bool self-attention mask of the decoder's query groups, True
    where query i must not attend to query j. The queries are, in order: ``num_dn``
    denoising queries in ``dn_groups`` equal groups, ``num_one2one`` one-to-one queries, and
    the rest (the one-to-many group). Each group sees itself; a denoising group also sees
    the one-to-one queries (which see neither the denoising nor the one-to-many queries)."""
    index = torch.arange(num_total, device=device)
    group = torch.where(index < num_dn, index // max(num_dn // max(dn_groups, 1), 1), index.new_full((), -1))
    group = torch.where(index >= num_dn + num_one2one, index.new_full((), -2), group)
    one2one = (index >= num_dn) & (index < num_dn + num_one2one)
    allowed = (group[:, None] == group[None, :]) | ((index < num_dn)[:, None] & one2one[None, :])
    return ~allowed


class TooFewTokensError(ValueError):
    """The encoder has fewer tokens than the two-stage selection needs queries."""


class FFN(nn.Module):
    """Linear -> ReLU -> dropout -> Linear -> dropout (the residual is added by the layer)."""

    def __init__(self, embed_dim: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(embed_dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, embed_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout2(apply_linear(self.linear2, self.dropout1(apply_linear(self.linear1, x, relu=True))))


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: x = LN(x + MSDeformAttn(x + pos)); x = LN(x + FFN(x))."""

    def __init__(self, embed_dim=256, num_heads=8, num_levels=4, num_points=4, ffn_dim=1024, dropout=0.1):
        super().__init__()
        self.self_attn = MSDeformAttn(embed_dim, num_heads, num_levels, num_points)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.ffn = FFN(embed_dim, ffn_dim, dropout)
        self.norm2 = nn.LayerNorm(embed_dim)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        """
        Args:
            src: (N, S, C) tokens; also the attention's value (without ``pos``).
            pos: (N, S, C) positional embedding, added to the query only.
            reference_points: (N, S, L, 2) in [0, 1].
            spatial_shapes: (L, 2) long; level_start_index: (L,) long.
            padding_mask: (N, S) bool, True at padding.

        Returns:
            (N, S, C).
        """
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout(attn))
        return self.norm2(src + self.ffn(src))


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer` (no final norm: the layers are post-norm)."""

    def __init__(self, num_layers: int = 6, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        """Same arguments and result as :meth:`DeformableEncoderLayer.forward`."""
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention -> LN -> deformable cross-attention -> LN -> FFN -> LN."""

    def __init__(self, embed_dim=256, num_heads=8, num_levels=4, num_points=4, ffn_dim=1024, dropout=0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn = MSDeformAttn(embed_dim, num_heads, num_levels, num_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.ffn = FFN(embed_dim, ffn_dim, dropout)
        self.norm3 = nn.LayerNorm(embed_dim)

    def forward(
        self, query, query_pos, reference_points, memory, spatial_shapes, level_start_index, memory_padding_mask=None,
        self_attn_mask=None,
    ):  # fmt: skip
        """
        Args:
            query: (N, Q, C) content queries; query_pos: (N, Q, C) their positional part,
                added to the queries and keys of the self-attention (not its values) and to
                the cross-attention query.
            reference_points: (N, Q, L, 2) points or (N, Q, L, 4) boxes, per-level normalized.
            memory: (N, S, C) encoder output (cross-attention value).
            spatial_shapes, level_start_index, memory_padding_mask: as in the encoder.
            self_attn_mask: None or (Q, Q) bool, True where query i must not attend to j
                (separates query groups that are trained apart).

        Returns:
            (N, Q, C).
        """
        q = k = query + query_pos
        attn = self.self_attn(q, k, query, attn_mask=self_attn_mask, need_weights=False)[0]
        query = self.norm1(query + self.dropout1(attn))
        attn = self.cross_attn(
            query + query_pos, reference_points, memory, spatial_shapes, level_start_index, memory_padding_mask
        )
        query = self.norm2(query + self.dropout2(attn))
        return self.norm3(query + self.ffn(query))


class DeformableDecoder(nn.Module):
    """A stack of :class:`DeformableDecoderLayer` with optional iterative box refinement."""

    def __init__(self, num_layers: int = 6, look_forward_twice: bool = False, **layer_kwargs):
        """
        Args:
            num_layers: decoder layers.
            look_forward_twice: with box refinement, return each layer's reference (the
                previous layer's boxes) with its gradient, so that layer l's box loss also
                refines layer l-1's prediction; the layers themselves still attend around
                detached references (DINO, Zhang et al., ICLR 2023, Sec. 3.5). Off:
                Deformable DETR's refinement, every reference detached.
            layer_kwargs: :class:`DeformableDecoderLayer` arguments.
        """
        super().__init__()
        self.look_forward_twice = look_forward_twice
        self.layers = nn.ModuleList(DeformableDecoderLayer(**layer_kwargs) for _ in range(num_layers))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(
        self, query, query_pos, reference, memory, spatial_shapes, level_start_index, valid_ratios,
        memory_padding_mask=None, reg_branches: Optional[Sequence[nn.Module]] = None, centre_scale=None,
        self_attn_mask=None,
    ):  # fmt: skip
        """
        Args:
            query, query_pos: (N, Q, C).
            reference: (N, Q, 4) boxes or (N, Q, 2) points, sigmoid space, normalized by
                the valid image size.
            memory, spatial_shapes, level_start_index, memory_padding_mask: as in the encoder.
            valid_ratios: (N, L, 2).
            reg_branches: box refinement when given: after layer l, ``reg_branches[l]``
                (C -> 4) predicts a delta added to the reference in inverse-sigmoid space
                (to cx, cy only for a point reference, whose result is then a box); the new
                reference is detached before the next layer.
            centre_scale: None or (N, 1, 2): centre deltas are divided by it (see
                :func:`~soit.modeling.box_ops.apply_box_delta`).
            self_attn_mask: None or (Q, Q) bool for every layer's self-attention (see
                :class:`DeformableDecoderLayer`).

        Returns:
            hs: (num_layers, N, Q, C) the output of every layer.
            references: (num_layers, N, Q, 4) the reference each layer attended around, in
                sigmoid space (with ``look_forward_twice``, not detached from the previous
                layer's box prediction). A point reference (x, y) is stored as (x, y, 0.5, 0.5):
                inverse_sigmoid(0.5) = 0, so adding a box delta to it in inverse-sigmoid
                space gives the same box as adding the delta to (x, y) alone.
        """
        hs, refs = [], []
        returned = reference  # what refs holds for this layer: detached unless look_forward_twice
        for lid, layer in enumerate(self.layers):
            if reference.shape[-1] == 4:
                ref_input = reference[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
                refs.append(returned)
            else:
                ref_input = reference[:, :, None] * valid_ratios[:, None]
                refs.append(torch.cat([reference, torch.full_like(reference, 0.5)], -1))
            query = layer(
                query, query_pos, ref_input, memory, spatial_shapes, level_start_index, memory_padding_mask, self_attn_mask
            )
            hs.append(query)
            if reg_branches is not None:
                new_reference = apply_box_delta(inverse_sigmoid(reference), reg_branches[lid](query), centre_scale)
                # Each layer refines the previous layer's boxes, but gradients do not flow
                # back through the chain of references (Deformable DETR's refinement);
                # look-forward-twice lets the next layer's box loss reach this prediction.
                reference = new_reference.sigmoid().detach()
                returned = new_reference.sigmoid() if self.look_forward_twice else reference
        return torch.stack(hs), torch.stack(refs)


class DeformableTransformer(nn.Module):
    """Deformable DETR encoder-decoder with two-stage queries and box refinement.

    The class and box branches belong to the caller (the SOIT head) and are passed to
    :meth:`forward`; the transformer only runs the branch of the encoder proposals and,
    with ``box_refine``, the per-layer box branches to move the references.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        *,
        num_queries: int = 300,
        two_stage: bool = True,
        box_refine: bool = True,
        pos_temperature: float = 10000,
        proposal_size: float = 0.05,
        mixed_query_selection: bool = False,
        look_forward_twice: bool = False,
        num_queries_one2many: int = 0,
    ):
        """
        Args:
            embed_dim, num_heads, num_levels, num_points, ffn_dim, dropout: the layers'
                width, attention heads, feature levels, sampling points per level and head,
                FFN hidden width and dropout probability.
            num_queries: decoder queries (the top-k encoder proposals in two-stage mode).
            two_stage: queries from the top-scoring encoder proposals; otherwise learned
                queries (``query_embedding``) with a learned reference point
                (``reference_points``), as in single-stage Deformable DETR.
            box_refine: refine the reference boxes after every decoder layer.
            pos_temperature: temperature of the sine encodings.
            proposal_size: width/height of the level-0 encoder proposals, doubled per level
                (fraction of the valid image size).
            mixed_query_selection: two-stage only: the selected proposals give the
                positional queries, the content queries are learned (``content_queries``)
                instead of also coming from the proposals (DINO, Zhang et al., ICLR 2023,
                Sec. 3.4). Off: Deformable DETR's two-stage queries (paper behaviour).
            look_forward_twice: box refinement only: see :class:`DeformableDecoder`.
            num_queries_one2many: two-stage only: in training, this many more proposals
                become a second query group, which the decoder's self-attention keeps apart
                from the first (neither attends to the other) and which the loss matches
                one-to-many (H-DETR's hybrid matching, Jia et al., CVPR 2023). In eval mode
                only the ``num_queries`` one-to-one queries run. 0: off (paper behaviour).
        """
        super().__init__()
        if embed_dim % 2 != 0:
            raise ValueError(f"embed_dim must be even for the sine encodings, got {embed_dim}")
        if mixed_query_selection and not two_stage:
            raise ValueError("mixed_query_selection selects positional queries from the encoder proposals: it needs two_stage=True")
        if num_queries_one2many < 0 or (num_queries_one2many and not two_stage):
            raise ValueError(
                f"num_queries_one2many={num_queries_one2many}: the one-to-many query group comes from the encoder "
                "proposals: it needs two_stage=True and a value >= 0"
            )
        if look_forward_twice and not box_refine:
            raise ValueError("look_forward_twice changes how the box refinement is trained: it needs box_refine=True")
        self.embed_dim = embed_dim
        self.mixed_query_selection = mixed_query_selection
        self.num_levels = num_levels
        self.num_queries = num_queries
        self.num_queries_one2many = num_queries_one2many
        self.two_stage = two_stage
        self.box_refine = box_refine
        self.pos_temperature = pos_temperature
        self.proposal_size = proposal_size
        layer_kwargs = dict(embed_dim=embed_dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points)
        layer_kwargs.update(ffn_dim=ffn_dim, dropout=dropout)
        self.level_embeds = nn.Parameter(torch.empty(num_levels, embed_dim))
        self.encoder = DeformableEncoder(num_encoder_layers, **layer_kwargs)
        self.decoder = DeformableDecoder(num_decoder_layers, look_forward_twice=look_forward_twice, **layer_kwargs)
        if two_stage:
            self.enc_output = nn.Linear(embed_dim, embed_dim)
            self.enc_output_norm = nn.LayerNorm(embed_dim)
            # 4 box coordinates x embed_dim / 2 sine features -> query position + content
            # (position only with mixed query selection: the content queries are learned)
            out_dim = embed_dim if mixed_query_selection else 2 * embed_dim
            self.pos_trans = nn.Linear(2 * embed_dim, out_dim)
            self.pos_trans_norm = nn.LayerNorm(out_dim)
            if mixed_query_selection:
                self.content_queries = nn.Embedding(num_queries + num_queries_one2many, embed_dim)
        else:
            self.query_embedding = nn.Embedding(num_queries, 2 * embed_dim)
            self.reference_points = nn.Linear(embed_dim, 2)
        self.reset_parameters()

    def reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embeds)
        if self.mixed_query_selection:
            nn.init.normal_(self.content_queries.weight)
        if not self.two_stage:
            nn.init.normal_(self.query_embedding.weight)
            nn.init.zeros_(self.reference_points.bias)

    def gen_encoder_proposals(self, memory, masks, memory_padding_mask, size_scale=None):
        """One proposal box per encoder token (docs/model.md, section 2, two-stage).

        Args:
            memory: (N, S, C).
            masks: L tensors (N, H_l, W_l) bool, True = pad.
            memory_padding_mask: (N, S) bool, the masks flattened.
            size_scale: None or (N, 2): the proposal sizes are divided by it, per axis
                (``SOIT(reference_size=...)``: the same size in pixels at any image size).

        Returns:
            output_memory: (N, S, C) memory with invalid tokens zeroed, through
                ``enc_output`` + ``enc_output_norm``.
            proposals: (N, S, 4) logit of (cx, cy, w, h): the token's pixel centre over the
                level's valid size, w = h = proposal_size * 2 ** level; +inf for invalid
                tokens (padding, or any coordinate outside (0.01, 0.99)).
        """
        proposals = []
        for lvl, m in enumerate(masks):
            h, w = m.shape[-2], m.shape[-1]
            ys = torch.arange(h, dtype=torch.float32, device=memory.device)
            xs = torch.arange(w, dtype=torch.float32, device=memory.device)
            grid = torch.stack([xs[None, :].expand(h, -1), ys[:, None].expand(-1, w)], -1)  # (h, w, 2)
            scale = valid_extent(m).view(-1, 1, 1, 2)
            centre = (grid[None] + 0.5) / scale  # (N, h, w, 2)
            wh = torch.full_like(centre, self.proposal_size * 2.0**lvl)
            if size_scale is not None:
                wh = wh / size_scale.view(-1, 1, 1, 2)
            proposals.append(torch.cat((centre, wh), -1).flatten(1, 2))
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        invalid = ~valid | memory_padding_mask[..., None]
        # Plain logit: padded centres lie outside (0, 1) and give NaN, replaced by +inf here.
        proposals = torch.log(proposals / (1 - proposals)).masked_fill(invalid, float("inf"))
        output_memory = memory.masked_fill(invalid, 0.0)
        return self.enc_output_norm(self.enc_output(output_memory)), proposals

    def embed_boxes(self, boxes, scale=None):
        """Query embedding of (N, n, 4) boxes in sigmoid space: the sine embedding of the
        box through ``pos_trans`` (two-stage); its first ``embed_dim`` channels are the
        positional query. ``scale``: (N, 2) factors of the embedded coordinates or None."""
        embedded = boxes if scale is None else boxes * scale.repeat(1, 2)[:, None]
        return self.pos_trans_norm(self.pos_trans(box_sine_embedding(embedded, self.embed_dim // 2, self.pos_temperature)))

    def forward(
        self,
        features: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        cls_branches: Optional[Sequence[nn.Module]] = None,
        reg_branches: Optional[Sequence[nn.Module]] = None,
        coordinate_scale: Optional[torch.Tensor] = None,
        scale_parts: Sequence[str] = (),
        denoising: Optional[Dict[str, torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            features: L maps (N, C, H_l, W_l), finest first (the neck's outputs).
            masks: L masks (N, H_l, W_l) bool, True at padding (the image mask resized
                to each level, nearest).
            cls_branches: modules C -> K, one per decoder layer + the proposal scorer at
                index num_decoder_layers; only the scorer is used here (two-stage: its logit 0
                ranks the proposals). Not needed in single-stage mode.
            reg_branches: modules C -> 4, indexed the same way: the one at
                num_decoder_layers refines the proposals (two-stage), the first
                num_decoder_layers move the references (``box_refine``). Single-stage needs
                only the first num_decoder_layers, and without ``box_refine`` none.
            coordinate_scale: None, or (N, 2) (x, y): each image's valid size over a
                reference size (``SOIT(reference_size=...)``). Applied to the parts named in
                ``scale_parts``: "position" (encoder sine encoding), "proposals" (proposal
                sizes), "queries" (the box embedding of the two-stage queries), "deltas"
                (centre deltas of the proposals and of the refinement). With it, these see
                pixel distances in units of the reference size instead of fractions of the
                image; for an image of the reference size nothing changes.
            denoising: two-stage only, training: denoising queries put before the others
                (:class:`~soit.modeling.denoising.DenoisingQueries`): "query" (N, D, C)
                content, "reference" (N, D, 4) noised boxes in sigmoid space, "groups" G.
                Their positional queries embed their boxes as the proposals' do. The
                self-attention mask lets the other queries never see them and a
                denoising group see only itself and the one-to-one queries (DN-DETR).

        Returns:
            A dict of tensors:
            - ``hs`` (num_decoder_layers, N, Q, C): decoder outputs of every layer. In
              training Q may count several groups, in this order: the D denoising queries,
              the one-to-one queries, the ``num_queries_one2many`` group.
            - ``init_reference`` (N, Q, 4) boxes (two-stage) or (N, Q, 2) points, sigmoid space.
            - ``inter_references`` (num_decoder_layers, N, Q, 4): the reference of every
              layer, sigmoid space (points padded with w = h = 0.5; see
              :meth:`DeformableDecoder.forward`). The head's boxes of layer l are
              ``sigmoid(inverse_sigmoid(inter_references[l]) + reg_branches[l](hs[l]))``.
              ``inter_references[0]`` is ``init_reference``; with ``box_refine`` the later
              ones are the previous layer's boxes, detached; without it they all equal
              ``init_reference``.
            - ``enc_outputs_class`` (N, S, K) and ``enc_outputs_coord`` (N, S, 4): proposal
              logits and boxes (sigmoid of proposal + delta; invalid tokens give 1.0), for the
              encoder loss. Present only in two-stage mode.
            - ``memory`` (N, S, C), ``pos`` (N, S, C) sine + level embedding,
              ``memory_padding_mask`` (N, S) bool, ``spatial_shapes`` (L, 2) long,
              ``level_start_index`` (L,) long, ``valid_ratios`` (N, L, 2) (w, h).
            Level 0 (P3) comes first in S: its tokens are ``[:, :H_0 * W_0]``.
        """
        if len(features) != self.num_levels or len(masks) != self.num_levels:
            raise ValueError(
                f"expected {self.num_levels} feature maps and masks, got {len(features)} and {len(masks)}"
            )
        num_dec = self.decoder.num_layers
        # two-stage: one branch per decoder layer + the proposal branch at index num_dec
        num_needed = num_dec + 1 if self.two_stage else num_dec
        if (self.two_stage or self.box_refine) and (reg_branches is None or len(reg_branches) < num_needed):
            raise ValueError(
                f"two_stage={self.two_stage}, box_refine={self.box_refine} need at least {num_needed} "
                f"reg_branches, got {None if reg_branches is None else len(reg_branches)}"
            )
        if self.two_stage and (cls_branches is None or len(cls_branches) < num_needed):
            raise ValueError(
                f"two_stage needs at least {num_needed} cls_branches, got "
                f"{None if cls_branches is None else len(cls_branches)}"
            )

        def scale_for(part):
            return coordinate_scale if coordinate_scale is not None and part in scale_parts else None

        centre_scale = None if scale_for("deltas") is None else coordinate_scale[:, None]
        src_flat, pos_flat, mask_flat = [], [], []
        for lvl, (feat, mask) in enumerate(zip(features, masks)):
            pos = sine_position_encoding(
                mask, self.embed_dim // 2, self.pos_temperature, coordinate_scale=scale_for("position")
            ).to(feat.dtype)
            src_flat.append(feat.flatten(2).transpose(1, 2))
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embeds[lvl].view(1, 1, -1))
            mask_flat.append(mask.flatten(1))
        src = torch.cat(src_flat, 1)
        pos = torch.cat(pos_flat, 1)
        mask_flat = torch.cat(mask_flat, 1)
        spatial_shapes, level_start_index = flatten_spatial_shapes(features)
        # float32 even under autocast: references and sampling locations need the precision
        valid_ratios = torch.stack([valid_ratios_from_mask(m) for m in masks], 1)

        enc_refs = encoder_reference_points(masks, valid_ratios)
        memory = self.encoder(src, pos, enc_refs, spatial_shapes, level_start_index, mask_flat)

        out = {}
        n, _, c = memory.shape
        if self.two_stage:
            output_memory, proposals = self.gen_encoder_proposals(memory, masks, mask_flat, scale_for("proposals"))
            enc_class = cls_branches[num_dec](output_memory)
            enc_coord_unact = apply_box_delta(proposals, reg_branches[num_dec](output_memory), centre_scale)
            num_select = self.num_queries + (self.num_queries_one2many if self.training else 0)
            if not torch.jit.is_tracing() and enc_class.shape[1] < num_select:
                raise TooFewTokensError(
                    f"{enc_class.shape[1]} encoder tokens cannot give {num_select} proposals; "
                    "use larger inputs or fewer num_queries"
                    + (" / num_queries_one2many" if num_select > self.num_queries else "")
                )
            topk = torch.topk(enc_class[..., 0], num_select, dim=1)[1]
            # the selected boxes are the decoder's starting point, not trained through it
            topk_unact = torch.gather(enc_coord_unact, 1, topk[..., None].expand(-1, -1, 4)).detach()
            reference = topk_unact.sigmoid()
            pos_trans = self.embed_boxes(reference, scale_for("queries"))
            if self.mixed_query_selection:
                query_pos, query = pos_trans, self.content_queries.weight[:num_select][None].expand(n, -1, -1)
            else:
                query_pos, query = torch.split(pos_trans, c, dim=2)
            if denoising is not None:
                query_pos = torch.cat([self.embed_boxes(denoising["reference"], scale_for("queries"))[..., :c], query_pos], 1)
                query = torch.cat([denoising["query"], query], 1)
                reference = torch.cat([denoising["reference"], reference], 1)
            out["enc_outputs_class"] = enc_class
            out["enc_outputs_coord"] = enc_coord_unact.sigmoid()
        else:
            if denoising is not None:
                raise ValueError("denoising queries need two_stage=True (their positions are embedded as the proposals')")
            query_pos, query = torch.split(self.query_embedding.weight, c, dim=1)
            query_pos = query_pos[None].expand(n, -1, -1)
            query = query[None].expand(n, -1, -1)
            reference = self.reference_points(query_pos).sigmoid()

        num_dn = 0 if denoising is None else denoising["query"].shape[1]
        self_attn_mask = None
        if query.shape[1] > self.num_queries:
            self_attn_mask = query_group_mask(
                query.shape[1], num_dn, 0 if denoising is None else denoising["groups"], self.num_queries, query.device
            )
        hs, references = self.decoder(
            query, query_pos, reference, memory, spatial_shapes, level_start_index, valid_ratios, mask_flat,
            reg_branches=reg_branches if self.box_refine else None, centre_scale=centre_scale,
            self_attn_mask=self_attn_mask,
        )  # fmt: skip
        out.update(
            hs=hs,
            init_reference=reference,
            inter_references=references,
            memory=memory,
            pos=pos,
            memory_padding_mask=mask_flat,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            valid_ratios=valid_ratios,
        )
        return out
