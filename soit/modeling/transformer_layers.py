"""The deformable transformer's layers and stacks (docs/model.md, section 2), and the
token geometry they share with the mask encoder: flattened level shapes, valid ratios and
the encoder's reference points.

Tensors are batch-first: N images, L levels, S = sum_l H_l * W_l flattened tokens, Q
queries, C channels. Reference points are normalized by each image's valid (unpadded) size
and multiplied by the valid ratios into the padded maps' coordinates in which the attention
samples. Shapes that vary with the input are read from tensor shapes, never from tensor
values, so that tracing records them as graph inputs rather than constants.
"""
from typing import Optional, Sequence

import torch
from torch import nn

from soit.layers import MSDeformAttn
from soit.layers.cpu_inference import apply_linear
from soit.layers.position_encoding import inverse_sigmoid, valid_extent

from .activation_checkpointing import maybe_checkpoint
from .box_ops import apply_box_delta

__all__ = [
    "DeformableEncoderLayer",
    "DeformableEncoder",
    "DeformableDecoderLayer",
    "DeformableDecoder",
    "reset_attention_parameters",
    "valid_ratios_from_mask",
    "encoder_reference_points",
    "flatten_spatial_shapes",
]


def reset_attention_parameters(module: nn.Module):
    """Xavier-uniform for every weight matrix of ``module``, then each deformable attention
    its own initialisation (sampling offsets in a ring around the reference, uniform
    attention): the encoder's, the decoder's and the mask encoder's starting point."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    for m in module.modules():
        if isinstance(m, MSDeformAttn):
            m.reset_parameters()


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
        self.checkpoint = False  # activation checkpointing of each layer in training

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        """Same arguments and result as :meth:`DeformableEncoderLayer.forward`."""
        for layer in self.layers:
            src = maybe_checkpoint(
                self.checkpoint and self.training, layer, src, pos, reference_points, spatial_shapes,
                level_start_index, padding_mask,
            )  # fmt: skip
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
        self.checkpoint = False  # activation checkpointing of each layer in training

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
            query = maybe_checkpoint(
                self.checkpoint and self.training, layer, query, query_pos, ref_input, memory, spatial_shapes,
                level_start_index, memory_padding_mask, self_attn_mask,
            )  # fmt: skip
            hs.append(query)
            if reg_branches is not None:
                new_reference = apply_box_delta(inverse_sigmoid(reference), reg_branches[lid](query), centre_scale)
                # Each layer refines the previous layer's boxes, but gradients do not flow
                # back through the chain of references (Deformable DETR's refinement);
                # look-forward-twice lets the next layer's box loss reach this prediction.
                reference = new_reference.sigmoid().detach()
                returned = new_reference.sigmoid() if self.look_forward_twice else reference
        return torch.stack(hs), torch.stack(refs)
