"""What inference needs to know about the training inputs: the objects' size and the input size.

A detector learns objects of the sizes its training inputs show; SOIT also learns positions
as fractions of its input (docs/scale.md). So inference needs two facts about training,
both measured at the network input, after the training augmentation:

* the distribution of object sizes (the side of a square of the box's area, in input
  pixels; objects cut by the input's border are left out), which
  :mod:`soit.modeling.auto_scale` matches at test time;
* the input size when every training input had one size (a fixed crop), which decides the
  tile size of inference; ``None`` when sizes varied (whole images, multi-scale resizing).

:func:`measure_training_scale` runs the training mapper over a sample of the training set
when training starts; the result is saved in every checkpoint (``"training_scale"``) and
restored with the weights. A user may set it instead (``model.training_scale``).
"""
import copy
import logging
import math
import random
from dataclasses import dataclass
from statistics import NormalDist
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "TrainingScale", "measure_training_scale", "SizeEstimate", "estimate_object_size", "found_something", "MIN_SCORE",
]  # fmt: skip

logger = logging.getLogger(__name__)

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True)
class TrainingScale:
    """Object sizes and input size of the training inputs.

    Attributes:
        object_sizes: the 5/25/50/75/95 % quantiles of the objects' size (square root of the
            box area) in network-input pixels, increasing.
        input_size: the largest training input, (height, width); measured, the largest
            shorter and the largest longer side of the inputs (a quarter turn is the same
            size): the crop size of a model trained on crops. None when unknown.
        num_objects: how many objects were measured (0 when set by hand).
        min_input_size: the smallest training input, the same way (None: ``input_size``,
            every input of one size). Inputs at least this large and at most
            ``input_size`` are sizes the model was trained on.
    """

    object_sizes: Tuple[float, ...]
    input_size: Optional[Tuple[int, int]] = None
    num_objects: int = 0
    min_input_size: Optional[Tuple[int, int]] = None

    def __post_init__(self):
        sizes = tuple(float(s) for s in self.object_sizes)
        if len(sizes) != len(QUANTILES) or any(not math.isfinite(s) or s <= 0 for s in sizes):
            raise ValueError(
                f"training_scale.object_sizes must be {len(QUANTILES)} positive sizes in pixels (the "
                f"{', '.join(f'{q:.0%}' for q in QUANTILES)} quantiles), got {list(self.object_sizes)}"
            )
        if list(sizes) != sorted(sizes):
            raise ValueError(f"training_scale.object_sizes must increase (quantiles), got {list(sizes)}")
        object.__setattr__(self, "object_sizes", sizes)
        for name in ("input_size", "min_input_size"):
            value = getattr(self, name)
            if value is not None:
                size = tuple(int(s) for s in value)
                if len(size) != 2 or min(size) < 1:
                    raise ValueError(f"training_scale.{name} must be (height, width) or None, got {value}")
                object.__setattr__(self, name, size)
        if self.min_input_size is not None:
            if self.input_size is None or any(a > b for a, b in zip(sorted(self.min_input_size), sorted(self.input_size))):
                raise ValueError(
                    f"training_scale.min_input_size={self.min_input_size} must not exceed "
                    f"input_size={self.input_size} (the largest training input)"
                )
            if sorted(self.min_input_size) == sorted(self.input_size):
                object.__setattr__(self, "min_input_size", None)  # one size: the plain record

    @property
    def smallest_input(self) -> Optional[Tuple[int, int]]:
        """The smallest training input (``input_size`` when all had one size)."""
        return self.min_input_size or self.input_size

    @property
    def median(self) -> float:
        return self.object_sizes[2]

    @property
    def log_half_spread(self) -> float:
        """Half the interquartile range of the log sizes: how far from the median, in log
        size, half of the training objects lie."""
        return 0.5 * math.log(self.object_sizes[3] / self.object_sizes[1])

    def log_size_quantile(self, q: float) -> float:
        """The log size below which a fraction ``q`` in (0, 1) of the training objects lie:
        the recorded quantiles interpolated linearly in normal score (z = Phi^-1(q)), and
        beyond the 5 % and 95 % ones extended with the slope of the outermost segment."""
        zs = [NormalDist().inv_cdf(p) for p in QUANTILES]
        logs = [math.log(v) for v in self.object_sizes]
        z = NormalDist().inv_cdf(min(max(q, 1e-9), 1 - 1e-9))
        i = 0 if z <= zs[1] else len(zs) - 2 if z >= zs[-2] else max(k for k in range(len(zs) - 1) if zs[k] <= z)
        return logs[i] + (z - zs[i]) * (logs[i + 1] - logs[i]) / (zs[i + 1] - zs[i])

    def median_log_range(self, count: int, level: float = 0.95):
        """``(low, high)``: where the median log size of ``count`` objects drawn from the
        training sizes falls with probability ``level``. The median of n draws lies at a
        quantile distributed as Beta((n+1)/2, (n+1)/2) (the middle order statistic), so the
        range follows from that distribution's central ``level`` interval: wide for one or
        two objects, the interquartile range by about ten."""
        from scipy.special import betaincinv

        a = (max(int(count), 1) + 1) / 2
        tail = (1 - level) / 2
        return (
            self.log_size_quantile(float(betaincinv(a, a, tail))),
            self.log_size_quantile(float(betaincinv(a, a, 1 - tail))),
        )

    def to_dict(self) -> Dict:
        return {
            "object_sizes": list(self.object_sizes),
            "input_size": list(self.input_size) if self.input_size else None,
            "num_objects": int(self.num_objects),
            "min_input_size": list(self.min_input_size) if self.min_input_size else None,
        }

    @classmethod
    def from_dict(cls, d) -> "TrainingScale":
        if isinstance(d, TrainingScale):
            return d
        try:
            d = dict(d)
        except (TypeError, ValueError):
            raise ValueError(f"training_scale must be a dict with object_sizes and input_size, got {d!r}") from None
        unknown = set(d) - {"object_sizes", "input_size", "num_objects", "min_input_size"}
        if unknown or "object_sizes" not in d:
            raise ValueError(
                f"training_scale must be a dict with object_sizes (and input_size, num_objects), got keys {sorted(d)}"
            )
        return cls(tuple(d["object_sizes"]), d.get("input_size"), int(d.get("num_objects") or 0), d.get("min_input_size"))

    def describe(self) -> str:
        sizes = "/".join(f"{s:.0f}" for s in self.object_sizes)
        if not self.input_size:
            crop = "input size unknown"
        elif self.min_input_size:
            crop = f"inputs from {self.min_input_size[0]}x{self.min_input_size[1]} to {self.input_size[0]}x{self.input_size[1]}"
        else:
            crop = f"{self.input_size[0]}x{self.input_size[1]} inputs"
        return f"objects of {sizes} px (5/25/50/75/95 %, {self.num_objects} measured), {crop}"


def _object_sizes(instances, margin: float = 1.0):
    """``(sizes, whole)``: (k,) the size of each object and whether the image border leaves it
    whole. A whole object's size is the side of the square of its box's area. An object the
    border cuts (a training crop, the edge of a test image) shows only part of itself: cut on
    its left or right its height is the best guess of its size, cut at its top or bottom its
    width (a lower bound when more than half of it is cut), cut at a corner NaN."""
    boxes = instances.gt_boxes.tensor if hasattr(instances, "gt_boxes") else instances.pred_boxes.tensor
    boxes = boxes.detach().float().cpu()
    h, w = instances.image_size
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    cut_x = (boxes[:, 0] <= margin) | (boxes[:, 2] >= w - margin)
    cut_y = (boxes[:, 1] <= margin) | (boxes[:, 3] >= h - margin)
    size = (wh[:, 0] * wh[:, 1]).sqrt()
    size = torch.where(cut_x & ~cut_y, wh[:, 1], size)
    size = torch.where(cut_y & ~cut_x, wh[:, 0], size)
    return torch.where(cut_x & cut_y, torch.full_like(size, float("nan")), size), ~(cut_x | cut_y)


def measure_training_scale(mapper, dataset_dicts: Sequence[Dict], num_samples: int = 200, seed: int = 0):
    """The :class:`TrainingScale` of what ``mapper`` makes of ``dataset_dicts``.

    ``num_samples`` dicts are drawn (with replacement, so random crops of a small set are
    sampled several times) and mapped as in training; the global random states are restored
    afterwards, so training draws the same augmentations as without the measurement.
    Returns None when no sample holds an object.
    """
    if not dataset_dicts:
        return None
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        picks = np.random.randint(0, len(dataset_dicts), size=num_samples)
        sizes, shapes = [], set()
        for i in picks:
            mapped = mapper(copy.deepcopy(dataset_dicts[i]))
            if mapped is None:
                continue
            shapes.add(tuple(sorted(int(s) for s in mapped["image"].shape[-2:])))  # a quarter turn is one size
            if "instances" in mapped and len(mapped["instances"]):
                size, whole = _object_sizes(mapped["instances"])
                sizes.append(size[whole])  # plenty of samples: whole objects only
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
    sizes = torch.cat(sizes) if sizes else torch.zeros(0)
    sizes = sizes[sizes > 0]  # NaN compares False
    if sizes.numel() == 0:
        return None
    quantiles = torch.quantile(sizes.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    largest = (max(s for s, _ in shapes), max(l for _, l in shapes))
    smallest = (min(s for s, _ in shapes), min(l for _, l in shapes))
    return TrainingScale(tuple(quantiles.tolist()), largest, int(sizes.numel()), smallest)


@dataclass(frozen=True)
class SizeEstimate:
    """The objects' size at one look: median and half interquartile range of the log sizes
    (network-input pixels), how many detections they rest on, and whether those are whole
    objects (False: only objects cut by the image border were found, and a cut object's
    visible extent is a lower bound of its size)."""

    log_median: float
    log_half_spread: float
    count: int
    whole: bool = True


def _weighted_quantile(values: torch.Tensor, weights: torch.Tensor, q: float) -> float:
    order = values.argsort()
    cum = weights[order].cumsum(0)
    idx = int(torch.searchsorted(cum, q * cum[-1]).clamp(max=values.numel() - 1))
    return float(values[order][idx])


MIN_SCORE = 0.2  # a look whose best detection scores less found nothing


def found_something(instances, min_score: float = MIN_SCORE) -> bool:
    """Whether a look found a confident detection (measurable or not)."""
    return instances is not None and len(instances) > 0 and float(instances.scores.max()) >= min_score


def estimate_object_size(instances, factor: float, min_score: float = MIN_SCORE, relative: float = 0.5):
    """The size of the objects found in one look, or None when nothing is found or nothing
    found can be measured (every confident detection cut at a corner of the image).

    Args:
        instances: the detections of an image predicted at ``factor`` times its size, boxes
            in the image's own coordinates.
        factor: the magnification of that look (sizes are scaled by it to network pixels).
        min_score: a look whose best score is below this found nothing.
        relative: detections scoring at least this fraction of the best score are measured,
            each weighted by its score. A fraction of the best, not a number of detections,
            so that the estimate does not depend on how many objects the image holds.
    """
    scores = instances.scores.detach().float().cpu()
    if scores.numel() == 0 or float(scores.max()) < min_score:
        return None
    keep = scores >= relative * scores.max()
    sizes, whole = _object_sizes(instances)
    any_whole = bool((keep & whole).any())
    if any_whole:  # whole objects where there are any; on a small crop, the cut ones
        keep &= whole
    sizes, weights = sizes[keep] * factor, scores[keep]
    ok = sizes > 0  # NaN compares False
    if not ok.any():
        return None
    logs, weights = sizes[ok].log(), weights[ok]
    q25, q50, q75 = (_weighted_quantile(logs, weights, q) for q in (0.25, 0.5, 0.75))
    return SizeEstimate(q50, 0.5 * (q75 - q25), int(ok.sum()), any_whole)
