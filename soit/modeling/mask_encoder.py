"""Mask encoder: the shared mask features F_mask (docs/model.md, section 4).

A few deformable encoder layers over the P3 (stride 8) tokens of the transformer memory,
attending within P3 only, then a projection to the C_mask channels that the
instance-aware transformer reads.
"""
import torch
from torch import nn

from .activation_checkpointing import maybe_checkpoint
from .transformer_layers import DeformableEncoderLayer, encoder_reference_points, reset_attention_parameters

__all__ = ["MaskEncoder"]


class MaskEncoder(nn.Module):
    """P3 memory (N, h*w, C) -> F_mask (N, C_mask, h, w).

    Paper ablation (Table 4): ``num_layers=0`` is the Linear + LayerNorm on P3 alone.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        mask_channels: int = 8,
        num_layers: int = 1,
        num_heads: int = 1,
        num_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
    ):
        """
        Args:
            embed_dim: width of the transformer memory.
            mask_channels: C_mask, channels of F_mask.
            num_layers: deformable encoder layers over P3 (0 allowed).
            num_heads, num_points: of the single-level deformable attention.
            ffn_dim, dropout: of the encoder layers.
        """
        super().__init__()
        self.mask_channels = mask_channels
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(embed_dim, num_heads, 1, num_points, ffn_dim, dropout) for _ in range(num_layers)
        )
        self.proj = nn.Linear(embed_dim, mask_channels)
        self.norm = nn.LayerNorm(mask_channels)
        self.checkpoint = False  # activation checkpointing of each layer in training
        self.reset_parameters()

    def reset_parameters(self):
        reset_attention_parameters(self)

    def forward(self, memory, pos, padding_mask, valid_ratios):
        """
        Args:
            memory: (N, S, C) with the P3 tokens first: either just the P3 slice
                (S = h * w) or the whole flattened encoder memory (only its first h * w
                tokens are read).
            pos: (N, S, C) the matching positional encoding (sine + level embedding).
            padding_mask: (N, h, w) bool, True at padding: the P3 mask; it gives h and w.
            valid_ratios: (N, 2) P3 valid ratios (w, h), or (N, L, 2) of which level 0 is used.

        Returns:
            F_mask: (N, C_mask, h, w). Padded pixels hold values too (not zeroed here: the
            instance-aware transformer masks its value map).
        """
        n, h, w = padding_mask.shape
        hw = h * w
        src = memory[:, :hw]
        if self.layers:
            pos = pos[:, :hw]
            if valid_ratios.dim() == 3:
                valid_ratios = valid_ratios[:, 0]
            valid_ratios = valid_ratios[:, None]  # (N, 1, 2): one level
            reference_points = encoder_reference_points([padding_mask], valid_ratios)
            spatial_shapes = torch._shape_as_tensor(padding_mask)[1:].to(memory.device)[None]
            level_start_index = spatial_shapes.new_zeros(1)
            mask_flat = padding_mask.flatten(1)
            for layer in self.layers:
                src = maybe_checkpoint(
                    self.checkpoint and self.training, layer, src, pos, reference_points, spatial_shapes,
                    level_start_index, mask_flat,
                )  # fmt: skip
        out = self.norm(self.proj(src))  # (N, h*w, C_mask)
        return out.transpose(1, 2).reshape(n, self.mask_channels, h, w)
