"""The deformable transformer with two-stage proposals and box refinement (docs/model.md,
section 2): the neck's levels flattened into one token sequence -> the deformable encoder ->
query selection (the top encoder proposals, two-stage) -> the decoder, which refines its
reference boxes layer by layer.

The layers live in ``transformer_layers.py``, the selection arithmetic in
``query_selection.py``. Tensors are batch-first (N images, L levels, S tokens, Q queries, C
channels); boxes are (cx, cy, w, h) normalized by each image's valid size.
"""
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from soit.layers.position_encoding import box_sine_embedding, sine_position_encoding

from .box_ops import apply_box_delta
from .query_selection import TooFewTokensError, encoder_proposals, query_group_mask, top_proposals
from .transformer_layers import (
    DeformableDecoder,
    DeformableDecoderLayer,
    DeformableEncoder,
    DeformableEncoderLayer,
    encoder_reference_points,
    flatten_spatial_shapes,
    reset_attention_parameters,
    valid_ratios_from_mask,
)

# the layers and selection helpers stay importable from here
__all__ = [
    "DeformableTransformer",
    "DeformableEncoderLayer",
    "DeformableEncoder",
    "DeformableDecoderLayer",
    "DeformableDecoder",
    "TooFewTokensError",
    "query_group_mask",
    "valid_ratios_from_mask",
    "encoder_reference_points",
    "flatten_spatial_shapes",
]


class DeformableTransformer(nn.Module):
    """Deformable DETR encoder-decoder with two-stage queries and box refinement.

    The class and box branches belong to the caller (the SOIT head) and are passed to
    :meth:`forward`; the transformer only runs the branch of the encoder proposals and,
    with ``box_refine``, the per-layer box branches to move the references.

    :meth:`forward`:

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
        reset_attention_parameters(self)
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
        invalid, proposals = encoder_proposals(masks, memory_padding_mask, self.proposal_size, size_scale)
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
        """Flatten -> encode -> select queries -> decode; arguments and outputs in the class
        docstring."""
        self.check_inputs(features, masks, cls_branches, reg_branches)

        def scale_for(part):
            return coordinate_scale if coordinate_scale is not None and part in scale_parts else None

        src, pos, padding, spatial_shapes, level_start_index = self.flatten(features, masks, scale_for("position"))
        # float32 even under autocast: references and sampling locations need the precision
        valid_ratios = torch.stack([valid_ratios_from_mask(m) for m in masks], 1)
        enc_refs = encoder_reference_points(masks, valid_ratios)
        memory = self.encoder(src, pos, enc_refs, spatial_shapes, level_start_index, padding)

        centre_scale = None if scale_for("deltas") is None else coordinate_scale[:, None]
        if self.two_stage:
            query, query_pos, reference, out = self.select_queries(
                memory, masks, padding, cls_branches, reg_branches, scale_for, centre_scale, denoising
            )
        else:
            query, query_pos, reference, out = self.learned_queries(memory.shape[0])

        hs, references = self.decoder(
            query, query_pos, reference, memory, spatial_shapes, level_start_index, valid_ratios, padding,
            reg_branches=reg_branches if self.box_refine else None, centre_scale=centre_scale,
            self_attn_mask=self.group_mask(query.shape[1], denoising),
        )  # fmt: skip
        out.update(hs=hs, init_reference=reference, inter_references=references, memory=memory, pos=pos)
        out.update(memory_padding_mask=padding, spatial_shapes=spatial_shapes, level_start_index=level_start_index)
        out["valid_ratios"] = valid_ratios
        return out

    def check_inputs(self, features, masks, cls_branches, reg_branches):
        """One feature map and mask per level; the branches the settings need."""
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

    def flatten(self, features, masks, position_scale=None):
        """The levels as one token sequence: (N, S, C) tokens, (N, S, C) positions (sine
        encoding + level embedding), (N, S) padding, (L, 2) level shapes, (L,) level starts."""
        src, pos, padding = [], [], []
        for lvl, (feat, mask) in enumerate(zip(features, masks)):
            enc = sine_position_encoding(mask, self.embed_dim // 2, self.pos_temperature, coordinate_scale=position_scale)
            src.append(feat.flatten(2).transpose(1, 2))
            pos.append(enc.to(feat.dtype).flatten(2).transpose(1, 2) + self.level_embeds[lvl].view(1, 1, -1))
            padding.append(mask.flatten(1))
        spatial_shapes, level_start_index = flatten_spatial_shapes(features)
        return torch.cat(src, 1), torch.cat(pos, 1), torch.cat(padding, 1), spatial_shapes, level_start_index

    def select_queries(self, memory, masks, padding, cls_branches, reg_branches, scale_for, centre_scale, denoising):
        """Two-stage queries: the top-scoring encoder proposals, refined by the proposal box
        branch, embedded as positional (and, unless mixed, content) queries; denoising
        queries first. Returns the queries, their positions, their reference boxes and the
        proposals' outputs for the encoder loss."""
        num_dec, c = self.decoder.num_layers, memory.shape[2]
        output_memory, proposals = self.gen_encoder_proposals(memory, masks, padding, scale_for("proposals"))
        enc_class = cls_branches[num_dec](output_memory)
        enc_coord_unact = apply_box_delta(proposals, reg_branches[num_dec](output_memory), centre_scale)
        num_select = self.num_queries + (self.num_queries_one2many if self.training else 0)
        hint = " / num_queries_one2many" if num_select > self.num_queries else ""
        reference = top_proposals(enc_class[..., 0], enc_coord_unact, num_select, hint)
        pos_trans = self.embed_boxes(reference, scale_for("queries"))
        if self.mixed_query_selection:
            query_pos, query = pos_trans, self.content_queries.weight[:num_select][None].expand(memory.shape[0], -1, -1)
        else:
            query_pos, query = torch.split(pos_trans, c, dim=2)
        if denoising is not None:
            query_pos = torch.cat([self.embed_boxes(denoising["reference"], scale_for("queries"))[..., :c], query_pos], 1)
            query = torch.cat([denoising["query"], query], 1)
            reference = torch.cat([denoising["reference"], reference], 1)
        return query, query_pos, reference, {"enc_outputs_class": enc_class, "enc_outputs_coord": enc_coord_unact.sigmoid()}

    def learned_queries(self, n: int):
        """Single-stage queries: learned content and positions, reference points from the
        positions (Deformable DETR). Denoising queries need two-stage (``SOIT`` checks)."""
        query_pos, query = torch.split(self.query_embedding.weight, self.embed_dim, dim=1)
        query_pos = query_pos[None].expand(n, -1, -1)
        return query[None].expand(n, -1, -1), query_pos, self.reference_points(query_pos).sigmoid(), {}

    def group_mask(self, num_total: int, denoising=None):
        """The decoder's self-attention mask when more than the one-to-one queries run
        (:func:`~soit.modeling.query_selection.query_group_mask`), else None."""
        if num_total <= self.num_queries:
            return None
        num_dn, groups = (0, 0) if denoising is None else (denoising["query"].shape[1], denoising["groups"])
        return query_group_mask(num_total, num_dn, groups, self.num_queries, self.level_embeds.device)
