"""Test-time scale search: predict an image at several rescalings and keep, per image, the
rescaling at which the model is most confident.

Why: a model trained on objects of one size in pixels finds objects of that size. Tiles
(``soit.modeling.tiling``) keep the normalised coordinates right on a large image, but not
the objects' size: on an image magnified x2 the objects are twice as large as any seen in
training and the model misses most of them (docs/scale.md). When the test images'
magnification is not known, or varies from image to image, the model can look at each image
at a few magnifications and keep the one where its detections are most confident: a
detector sure of many objects is looking at them at a size it knows.

The confidence of one rescaling is the mean of its ``top_k`` highest scores (missing
detections count as 0): how sure the model is of the objects it is surest of. Not a sum
over all confident detections: at too large a magnification the model cuts each object into
several confident pieces, so the number of confident detections grows at the wrong scale
(measured in ``docs/scale.md``). The detections of the chosen rescaling are returned in the
original image's coordinates; the others are dropped (no merging across scales, so no
duplicates).
"""
import math
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

__all__ = ["check_test_scales", "rescale_input", "confidence", "select_scale"]


def check_test_scales(test_scales: Sequence[float], top_k: int) -> tuple:
    """The scales as a tuple of floats; a clear error for anything that is not a list of
    distinct positive numbers or for a ``top_k`` that is not a positive integer."""
    try:
        scales = tuple(float(s) for s in test_scales)
    except (TypeError, ValueError):
        raise ValueError(f"test_scales must be a list of positive numbers, got {test_scales!r}") from None
    if any(not math.isfinite(s) or s <= 0 for s in scales):
        raise ValueError(f"test_scales must be positive numbers, got {list(test_scales)}")
    if len(set(scales)) != len(scales):
        raise ValueError(f"test_scales has a scale twice: {list(test_scales)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"test_scale_top_k must be a positive integer, got {top_k!r}")
    return scales


def rescale_input(x: Dict, factor: float) -> Dict:
    """A copy of one model input whose "image" is resized by ``factor`` (bilinear,
    antialiased when shrinking) and whose output size ("height", "width") stays the
    original one, so that the model returns its detections in the original coordinates."""
    image = x["image"]
    h, w = int(image.shape[-2]), int(image.shape[-1])
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    out = dict(x)
    out["height"], out["width"] = x.get("height", h), x.get("width", w)
    if size != (h, w):
        resized = F.interpolate(
            image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=factor < 1
        )
        out["image"] = resized[0]
    return out


def confidence(scores: torch.Tensor, top_k: int) -> float:
    """The mean of the ``top_k`` highest scores, missing ones counting as 0."""
    return float(scores.float().topk(min(top_k, scores.numel())).values.sum()) / top_k


def select_scale(scores_per_scale: List[torch.Tensor], top_k: int) -> int:
    """Index of the most confident rescaling (the first of equals)."""
    values = [confidence(s, top_k) for s in scores_per_scale]
    return max(range(len(values)), key=lambda i: (values[i], -i))
