"""Sine position encodings and the inverse sigmoid used by the deformable transformer.

All functions use tensor operations only (no Python numbers read back from tensors), so
they trace with dynamic shapes: a TorchScript/ONNX graph traced at one image size runs at
another.
"""
import math

import torch

__all__ = ["inverse_sigmoid", "sine_embedding", "sine_position_encoding", "box_sine_embedding", "valid_extent"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Logit of ``x`` clamped to [0, 1]; both ``x`` and ``1 - x`` are floored at ``eps``
    so that references at exactly 0 or 1 map to finite values (about +-11.5)."""
    x = x.clamp(min=0, max=1)
    x1 = x.clamp(min=eps)
    x2 = (1 - x).clamp(min=eps)
    return torch.log(x1 / x2)


def valid_extent(padding_mask: torch.Tensor, fraction: bool = False) -> torch.Tensor:
    """(N, 2) float (valid width, valid height) in pixels of each (N, H, W) padding mask
    (True = pad), or with ``fraction`` as parts of (W, H). Images are padded at the bottom
    and right, so the first row and column give the valid width and height."""
    extent = torch.stack([(~padding_mask[:, 0, :]).sum(1), (~padding_mask[:, :, 0]).sum(1)], -1).to(torch.float32)
    if fraction:
        h, w = padding_mask.shape[-2:]
        extent = extent / torch.tensor([w, h], dtype=torch.float32, device=padding_mask.device)
    return extent


def _frequencies(num_feats: int, temperature: float, device) -> torch.Tensor:
    """(num_feats,) divisors temperature ** (2 * (i // 2) / num_feats): feature pairs
    (2k, 2k+1) share one frequency, the first taking its sine and the second its cosine."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * (dim_t // 2) / num_feats)


def sine_embedding(coords: torch.Tensor, num_feats: int, temperature: float = 10000) -> torch.Tensor:
    """Sine embedding of already scaled coordinates.

    Args:
        coords: (..., K) float, K coordinates per element (already multiplied by the scale).
        num_feats: features per coordinate (even).

    Returns:
        (..., K * num_feats): for each coordinate in order, num_feats features
        [sin(c / t_0), cos(c / t_0), sin(c / t_2), cos(c / t_2), ...].
    """
    if num_feats % 2 != 0:
        raise ValueError(f"num_feats must be even (sin/cos pairs), got {num_feats}")
    pos = coords[..., None] / _frequencies(num_feats, temperature, coords.device)
    # (..., K, F/2, 2) -> (..., K * F): sin and cos interleaved
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1)
    return pos.flatten(-3)


def sine_position_encoding(
    padding_mask: torch.Tensor,
    num_feats: int = 128,
    temperature: float = 10000,
    normalize: bool = True,
    scale: float = 2 * math.pi,
    offset: float = -0.5,
    eps: float = 1e-6,
    coordinate_scale: "torch.Tensor | None" = None,
) -> torch.Tensor:
    """2-D sine position encoding of a padded feature map (docs/model.md, section 2).

    The coordinate of a pixel along an axis is the count of valid pixels up to and including
    it (a cumulative sum, so padding does not shift valid pixels). With ``normalize`` it is
    mapped to (embed + offset) / (embed at the last row/column + eps) * scale, i.e. to
    (0, 2*pi) over the valid region of each image.

    Args:
        padding_mask: (N, H, W) bool, True at padding.
        coordinate_scale: None, or (N, 2) (x, y) factors applied to the normalized
            coordinates (``SOIT(reference_size=...)``: valid size over the reference size,
            so that a pixel gets the same coordinate whatever the image size).

    Returns:
        (N, 2 * num_feats, H, W) float32: the num_feats y features, then the num_feats
        x features, each with sin at even and cos at odd indices.
    """
    not_mask = (~padding_mask).to(torch.float32)
    y_embed = not_mask.cumsum(1)
    x_embed = not_mask.cumsum(2)
    if normalize:
        # Padded columns/rows have a last value of 0: their coordinates become large
        # (negative), which is the reference behaviour; padded tokens are masked downstream.
        y_embed = (y_embed + offset) / (y_embed[:, -1:, :] + eps) * scale
        x_embed = (x_embed + offset) / (x_embed[:, :, -1:] + eps) * scale
    if coordinate_scale is not None:
        y_embed = y_embed * coordinate_scale[:, 1, None, None]
        x_embed = x_embed * coordinate_scale[:, 0, None, None]
    pos = sine_embedding(torch.stack((y_embed, x_embed), dim=-1), num_feats, temperature)
    return pos.permute(0, 3, 1, 2)


def box_sine_embedding(
    boxes: torch.Tensor, num_feats: int = 128, temperature: float = 10000, scale: float = 2 * math.pi
) -> torch.Tensor:
    """Sine embedding of normalized boxes, used for the two-stage decoder queries.

    Args:
        boxes: (N, Q, 4) (cx, cy, w, h) in [0, 1].

    Returns:
        (N, Q, 4 * num_feats): cx, cy, w, h blocks of num_feats interleaved sin/cos features.
    """
    return sine_embedding(boxes * scale, num_feats, temperature)
