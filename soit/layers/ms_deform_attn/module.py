"""The multi-scale deformable attention module of Deformable DETR (Zhu et al. 2021, Eq. 3)."""

import math

import torch
from torch import nn

from ..cpu_inference import apply_linear
from ..precision import fp32_under_autocast
from .dispatch import ms_deform_attn, offsets_kernel
from .recording import record_call, recording

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module.

    Parameter names (``sampling_offsets``, ``attention_weights``, ``value_proj``,
    ``output_proj``) match the official checkpoints, so conversion is a renaming.

    ``attention_fp32`` (set by ``SOIT(attention_fp32=True)``): under autocast, the sampling
    offsets, weights, locations and the sampling itself run in float32
    (:func:`soit.layers.precision.fp32_under_autocast`).
    """

    attention_fp32 = False

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self):
        # Deformable DETR's init: offsets start on a ring of directions, growing with the point index.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        for i in range(self.num_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query, reference_points, value, spatial_shapes, level_start_index, value_padding_mask=None):
        """
        Args:
            query: (N, Lq, C), positional embedding already added.
            reference_points: (N, Lq, L, 2) as (x, y) in [0, 1], or (N, Lq, L, 4) as
                (cx, cy, w, h) boxes in [0, 1].
            value: (N, S, C), the flattened multi-level features.
            spatial_shapes: (L, 2) long, (H_l, W_l).
            level_start_index: (L,) long.
            value_padding_mask: (N, S) bool, True at padding (those values are zeroed).

        Returns:
            (N, Lq, C).
        """
        N, Lq, _ = query.shape
        M = self.num_heads
        v = apply_linear(self.value_proj, value)
        if value_padding_mask is not None:
            v = v.masked_fill(value_padding_mask[..., None], 0.0)
        v = v.view(N, v.shape[1], M, self.embed_dim // M)
        out = fp32_under_autocast(
            self.attention_fp32, v.device.type, self._sample, query, reference_points, v, spatial_shapes, level_start_index
        )
        return apply_linear(self.output_proj, out)

    def _sample(self, query, reference_points, v, spatial_shapes, level_start_index):
        """The attention's output before the output projection: (N, Lq, M * D)."""
        N, Lq, _ = query.shape
        M, L, P = self.num_heads, self.num_levels, self.num_points
        offsets = apply_linear(self.sampling_offsets, query).view(N, Lq, M, L, P, 2)
        weights = apply_linear(self.attention_weights, query).view(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)
        if reference_points.shape[-1] == 2:
            fused = None if recording() else offsets_kernel(v, offsets, weights, reference_points)
            if fused is not None:  # CPU inference: the same locations, formed inside the kernel
                return fused(
                    v.contiguous(), spatial_shapes, level_start_index, reference_points.contiguous(),
                    offsets.contiguous(), weights.contiguous(),
                )  # fmt: skip
            # offsets are in pixels of each level: normalise by (W_l, H_l)
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points must end in 2 (points) or 4 (boxes), got shape {tuple(reference_points.shape)}"
            )
        if recording():
            record_call(self, spatial_shapes, level_start_index, locations, weights, reference_points)
        return ms_deform_attn(v, spatial_shapes, level_start_index, locations, weights)

