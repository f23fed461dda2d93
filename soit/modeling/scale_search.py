"""Test-time scale search: predict an image at several rescalings and keep, per image, the
rescaling at which the model is most confident.

Why: a model trained on objects of one size in pixels finds objects of that size. Tiles
(``soit.modeling.tiling``) keep the normalised coordinates right on a large image, but not
the objects' size: on an image magnified x2 the objects are twice as large as any seen in
training and the model misses most of them (docs/scale.md). When the test images'
magnification is not known, or varies from image to image, the model can look at each image
at a few magnifications and keep the one where its detections are most confident: a
detector sure of many objects is looking at them at a size it knows.

The confidence of one rescaling is the sum of its detection scores above
``score_threshold``: it grows with the number of objects found and with how sure the model
is of each, and ignores the low-scoring tail that every set predictor emits. The detections
of the chosen rescaling are returned in the original image's coordinates; the others are
dropped (no merging across scales, so no duplicates).
"""
import math
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

__all__ = ["check_test_scales", "rescale_input", "confidence", "select_scale"]


def check_test_scales(test_scales: Sequence[float], score_threshold: float) -> tuple:
    """The scales as a tuple of floats; a clear error for anything that is not a list of
    positive numbers or for a threshold outside [0, 1)."""
    try:
        scales = tuple(float(s) for s in test_scales)
    except (TypeError, ValueError):
        raise ValueError(f"test_scales must be a list of positive numbers, got {test_scales!r}") from None
    if any(not math.isfinite(s) or s <= 0 for s in scales):
        raise ValueError(f"test_scales must be positive numbers, got {list(test_scales)}")
    if len(set(scales)) != len(scales):
        raise ValueError(f"test_scales has a scale twice: {list(test_scales)}")
    if not 0 <= score_threshold < 1:
        raise ValueError(f"test_scale_score_threshold must be in [0, 1), got {score_threshold}")
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


def confidence(scores: torch.Tensor, score_threshold: float) -> float:
    """The sum of the scores above ``score_threshold``."""
    return float(scores[scores > score_threshold].sum())


def select_scale(scores_per_scale: List[torch.Tensor], score_threshold: float) -> int:
    """Index of the most confident rescaling (the first of equals)."""
    values = [confidence(s, score_threshold) for s in scores_per_scale]
    return max(range(len(values)), key=lambda i: (values[i], -i))
