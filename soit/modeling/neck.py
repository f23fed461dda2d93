"""Input projections from the backbone to the transformer (docs/model.md, section 1).

No FPN: each backbone level is projected to the transformer width on its own, and the
coarsest extra level is computed from the last backbone feature map.
"""
from typing import List, Sequence

import torch
from torch import nn

__all__ = ["ChannelMapper"]


class ConvGN(nn.Module):
    """Conv2d without bias followed by GroupNorm, no activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, num_groups: int):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.gn = nn.GroupNorm(num_groups, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gn(self.conv(x))


class ChannelMapper(nn.Module):
    """Projects backbone maps (e.g. C3, C4, C5) to ``out_channels`` and adds coarser levels.

    Level i of the input goes through a 1x1 conv + GroupNorm. The first extra level is a
    3x3 stride-2 conv + GroupNorm on the *last input* (C5, not its projection, as in the
    official model); further extra levels take the previous extra output.

    State-dict keys: ``convs.{i}.conv.weight``, ``convs.{i}.gn.{weight,bias}``,
    ``extra_convs.{j}.conv.weight``, ``extra_convs.{j}.gn.{weight,bias}``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        num_extra_levels: int = 1,
        num_groups: int = 32,
    ):
        """
        Args:
            in_channels: channels of each input level, finest first (R-50: [512, 1024, 2048]).
            out_channels: channels of every output level (the transformer width).
            num_extra_levels: stride-2 levels appended after the inputs.
            num_groups: GroupNorm groups; must divide ``out_channels``.
        """
        super().__init__()
        if out_channels % num_groups != 0:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by num_groups ({num_groups})")
        if len(in_channels) == 0:
            raise ValueError("in_channels must list at least one input level")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.convs = nn.ModuleList(ConvGN(c, out_channels, 1, 1, num_groups) for c in self.in_channels)
        extra_in = [self.in_channels[-1]] + [out_channels] * max(num_extra_levels - 1, 0)
        self.extra_convs = nn.ModuleList(ConvGN(c, out_channels, 3, 2, num_groups) for c in extra_in[:num_extra_levels])
        self.reset_parameters()

    @property
    def num_levels(self) -> int:
        return len(self.convs) + len(self.extra_convs)

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """
        Args:
            features: ``len(in_channels)`` tensors (N, in_channels[i], H_i, W_i), finest first.

        Returns:
            ``num_levels`` tensors (N, out_channels, H_l, W_l), finest first; each extra
            level has the size ceil(H / 2) x ceil(W / 2) of the level before it.
        """
        if len(features) != len(self.convs):
            raise ValueError(
                f"ChannelMapper expects {len(self.convs)} feature maps (channels {self.in_channels}), "
                f"got {len(features)}"
            )
        outs = [conv(x) for conv, x in zip(self.convs, features)]
        prev = features[-1]
        for conv in self.extra_convs:
            prev = conv(prev)
            outs.append(prev)
        return outs
