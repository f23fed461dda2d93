"""Augmentations for SOIT: the DETR training recipe and random 90-degree rotations.

Everything here is a detectron2 ``Augmentation`` or ``Transform``, so the lists plug into
:class:`soit.data.SOITDatasetMapper` (or any detectron2 mapper) unchanged.
"""
from typing import List, Sequence, Tuple

import numpy as np
from detectron2.data import transforms as T

__all__ = [
    "Rot90Transform",
    "RandomRotation90",
    "ScaleBy",
    "RandomRescale",
    "detr_augmentations",
    "detr_test_augmentation",
]

# The DETR recipe (docs/model.md, section 8): shorter side 480, 512, ..., 800, longer side <= 1333.
DETR_MIN_SIZES = tuple(range(480, 801, 32))
DETR_MAX_SIZE = 1333
DETR_CROP_MIN_SIZES = (400, 500, 600)
DETR_CROP_SIZE = (384, 600)


class Rot90Transform(T.Transform):
    """Rotate by ``k`` quarter turns counter-clockwise, as ``np.rot90(image, k)``.

    The rotation is exact on the pixel grid, so masks rotate without interpolation and
    boxes built from rotated corners stay tight. Coordinates are continuous pixel
    coordinates (a pixel (row r, column c) covers [c, c + 1] x [r, r + 1]); a k = 1 turn
    maps (x, y) to (y, W - x) in an image of width W.
    """

    def __init__(self, h: int, w: int, k: int):
        """
        Args:
            h, w: height and width of the input image, in pixels.
            k: number of counter-clockwise quarter turns (any integer; taken modulo 4).
        """
        super().__init__()
        self._set_attributes({"h": int(h), "w": int(w), "k": int(k) % 4})

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        """(H, W) or (H, W, C) -> the rotated array (W, H[, C]) when k is odd."""
        # Contiguous output: later transforms (PIL resize) and torch.as_tensor need it.
        return np.ascontiguousarray(np.rot90(img, self.k, axes=(0, 1)))

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """(N, 2) array of absolute (x, y) -> rotated (x, y)."""
        coords = np.asarray(coords, dtype=np.float64)
        x, y = coords[:, 0], coords[:, 1]
        if self.k == 1:
            new = (y, self.w - x)
        elif self.k == 2:
            new = (self.w - x, self.h - y)
        elif self.k == 3:
            new = (self.h - y, x)
        else:
            new = (x, y)
        return np.stack(new, axis=1)

    def inverse(self) -> "Rot90Transform":
        # The inverse starts from the rotated image, whose sides swap for odd k.
        h, w = (self.w, self.h) if self.k % 2 else (self.h, self.w)
        return Rot90Transform(h, w, -self.k)


class RandomRotation90(T.Augmentation):
    """Rotate by a random number of quarter turns, drawn uniformly from ``ks``.

    A fair augmentation where orientation carries no meaning (microscopy, aerial images);
    with a horizontal flip it reaches all eight symmetries of the square.
    """

    def __init__(self, ks: Sequence[int] = (0, 1, 2, 3)):
        """
        Args:
            ks: the quarter-turn counts to choose from (counter-clockwise).
        """
        super().__init__()
        if len(ks) == 0:
            raise ValueError("RandomRotation90 needs at least one quarter-turn count in `ks`, got none")
        self.ks = tuple(int(k) % 4 for k in ks)

    def get_transform(self, image: np.ndarray) -> T.Transform:
        k = self.ks[np.random.randint(len(self.ks))]
        if k == 0:
            return T.NoOpTransform()
        return Rot90Transform(image.shape[0], image.shape[1], k)


class ScaleBy(T.Augmentation):
    """Resize by a fixed factor (both sides, rounded to whole pixels), e.g. to evaluate a
    model on a test set shown at 0.5x or 2x its size."""

    def __init__(self, factor: float):
        """
        Args:
            factor: the size multiplier (> 0).
        """
        super().__init__()
        if not factor > 0:
            raise ValueError(f"ScaleBy needs a positive factor, got {factor!r}")
        self.factor = float(factor)

    def get_transform(self, image: np.ndarray) -> T.Transform:
        h, w = image.shape[:2]
        new_h, new_w = max(1, round(h * self.factor)), max(1, round(w * self.factor))
        if (new_h, new_w) == (h, w):
            return T.NoOpTransform()
        return T.ResizeTransform(h, w, new_h, new_w)


class RandomRescale(T.Augmentation):
    """Resize each image by a random factor from [min_scale, max_scale] (relative to its own
    size), e.g. before a fixed-size crop, so that a model trained on crops sees the objects
    at every size of that range (multi-scale training for small data; docs/scale.md)."""

    def __init__(self, min_scale: float, max_scale: float, distribution: str = "uniform"):
        """
        Args:
            min_scale, max_scale: the range of the size multiplier (0 < min <= max).
            distribution: "uniform" in the factor, or "log-uniform" (as many draws shrink
                as enlarge, e.g. half of them below 1 for 0.5..2).
        """
        super().__init__()
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"RandomRescale needs 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        if distribution not in ("uniform", "log-uniform"):
            raise ValueError(f"RandomRescale distribution must be 'uniform' or 'log-uniform', got {distribution!r}")
        self.min_scale, self.max_scale, self.distribution = float(min_scale), float(max_scale), distribution

    def get_transform(self, image: np.ndarray) -> T.Transform:
        if self.distribution == "uniform":
            factor = np.random.uniform(self.min_scale, self.max_scale)
        else:
            factor = np.exp(np.random.uniform(np.log(self.min_scale), np.log(self.max_scale)))
        return ScaleBy(float(factor)).get_transform(image)


def detr_augmentations(
    min_sizes: Sequence[int] = DETR_MIN_SIZES,
    max_size: int = DETR_MAX_SIZE,
    crop_min_sizes: Sequence[int] = DETR_CROP_MIN_SIZES,
    crop_size: Tuple[int, int] = DETR_CROP_SIZE,
    *,
    extra: Sequence[T.Augmentation] = (),
) -> Tuple[List[T.Augmentation], List[T.Augmentation]]:
    """The two branches of the DETR training augmentation (docs/model.md, section 8).

    :class:`SOITDatasetMapper` applies one of them per image, each with probability 1/2.
    Both start with a random horizontal flip (then ``extra``) so that each list is complete
    on its own.

    Args:
        min_sizes: shorter-side lengths (pixels) to choose from in the final resize.
        max_size: upper bound of the longer side after the final resize (pixels).
        crop_min_sizes: shorter-side lengths of the resize before the crop (no longer-side
            bound, as in DETR).
        crop_size: (min, max) side of the random crop in pixels; height and width are drawn
            independently and never exceed the image.
        extra: augmentations applied right after the flip in both branches (e.g.
            ``[RandomRotation90()]`` for data without a preferred orientation).

    Returns:
        ``(augmentation, augmentation_with_crop)``: the mapper's two constructor arguments.
    """
    head = [T.RandomFlip(prob=0.5, horizontal=True, vertical=False), *extra]
    final_resize = T.ResizeShortestEdge(list(min_sizes), max_size=max_size, sample_style="choice")
    augmentation = head + [final_resize]
    augmentation_with_crop = head + [
        T.ResizeShortestEdge(list(crop_min_sizes), sample_style="choice"),
        T.RandomCrop("absolute_range", tuple(crop_size)),
        final_resize,
    ]
    return augmentation, augmentation_with_crop


def detr_test_augmentation(min_size: int = 800, max_size: int = DETR_MAX_SIZE) -> List[T.Augmentation]:
    """The test-time resize: shorter side ``min_size``, longer side at most ``max_size``."""
    return [T.ResizeShortestEdge(min_size, max_size=max_size)]
