"""Mask losses at points instead of every pixel (PointRend, Kirillov et al., CVPR 2020;
Mask2Former): where to read a mask (the least certain logits and random points, in the
image, never in its padding) and bilinear reads at those points."""
import torch
import torch.nn.functional as F

__all__ = ["sample_mask_points", "point_sample"]


def sample_mask_points(logits, extent, num_points, oversample=3.0, importance=0.75):
    """Where to evaluate point-sampled mask losses (PointRend, Kirillov et al., CVPR 2020, as
    trained by Mask2Former, Cheng et al., CVPR 2022): ``oversample * num_points`` random points,
    of which the ``importance * num_points`` with the least certain logits (closest to 0)
    are kept, plus the rest drawn at random. No gradient.

    Args:
        logits: (N, h, w) mask logits over the padded map.
        extent: (N, 2) (x, y) part of the padded map that is image, in (0, 1].
        num_points, oversample, importance: as above (importance in [0, 1]).

    Returns:
        (N, num_points, 2) (x, y) in [0, 1] of the padded map.
    """
    n = logits.shape[0]
    with torch.no_grad():
        extent = extent[:, None].to(logits.dtype)
        num_uncertain = int(importance * num_points)
        if num_uncertain > 0:
            candidates = torch.rand(n, max(int(oversample * num_points), num_uncertain), 2, device=logits.device) * extent
            certainty = point_sample(logits, candidates).abs()
            chosen = certainty.topk(num_uncertain, dim=1, largest=False).indices
            uncertain = candidates.gather(1, chosen[..., None].expand(-1, -1, 2))
        else:
            uncertain = logits.new_zeros(n, 0, 2)
        rest = torch.rand(n, num_points - num_uncertain, 2, device=logits.device) * extent
        return torch.cat([uncertain, rest], 1)


def point_sample(maps, points):
    """(N, H, W) maps read bilinearly at (N, P, 2) (x, y) points in [0, 1]: pixel k covers
    [k / W, (k + 1) / W) (``align_corners=False``); within half a pixel of the border the
    border value (replicated, as the dense loss's upsampling does). Returns (N, P)."""
    grid = (2 * points - 1)[:, :, None].to(maps.dtype)
    return F.grid_sample(maps[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0, :, 0]
