"""Dataset mapper: detectron2 dataset dicts -> SOIT inputs, with the DETR augmentation.

Masks are always rasterised at the original image size first (COCO polygons, compressed
and uncompressed RLE alike) and then go through the same pixel transforms as the image.
One path for every format means a polygon and its RLE give identical masks after any
augmentation, and crops need no polygon clipping (which would need shapely).
"""
import collections.abc
import functools
import logging
import struct
import sys
import zlib
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import common as d2_common
from detectron2.data import transforms as T
from detectron2.data.detection_utils import check_image_size, convert_PIL_to_numpy
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import log_every_n_seconds
from PIL import Image, ImageOps

from .check import rle_problem

__all__ = ["SOITDatasetMapper", "read_image_8bit", "decode_segmentation", "mask_to_box", "patch_map_dataset_fallback"]

logger = logging.getLogger(__name__)

# Reasons an annotation is dropped. Crowd regions and instances that a crop or a resize
# removes are part of normal training; the others point at a problem in the annotations,
# so they are reported as warnings.
CROWD = "crowd"
DEGENERATE_BOX = "degenerate_box"
EMPTY_MASK = "empty_mask"
MASK_SIZE_MISMATCH = "mask_size_mismatch"
INVALID_RLE = "invalid_rle"
LOST_IN_AUGMENTATION = "lost_in_augmentation"
_EXPECTED_DROPS = frozenset({CROWD, LOST_IN_AUGMENTATION})

# What PIL raises on truncated or corrupt files (UnidentifiedImageError is an OSError).
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)
# PIL modes with more than 8 bits per sample; PIL's own conversion to RGB clips them at 255.
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_SUMMARY_PERIOD_S = 300


class _IndexableSet(set):
    """A set that ``random.sample`` accepts: Python >= 3.11 only samples from sequences."""

    def __getitem__(self, index):
        # Only reached when a sample fails, so sorting each time costs nothing that matters.
        return sorted(self)[index]


collections.abc.Sequence.register(_IndexableSet)


def patch_map_dataset_fallback():
    """A compatibility fix of detectron2's ``MapDataset`` for Python >= 3.11; idempotent.

    ``MapDataset`` replaces a sample its mapper returned ``None`` for with
    ``random.sample(<set of indices>, k=1)``, which raises ``TypeError`` since Python 3.11
    (detectron2 v0.6 and later releases), so one unreadable image would stop training. Its
    candidate set becomes an :class:`_IndexableSet`; nothing else changes, and a detectron2
    that samples from ``sorted(...)`` works the same with it. When every sample fails, the
    error says so instead of detectron2's "Sample larger than population".

    Applied in one place: :class:`SOITDatasetMapper`'s constructor (the mapper that returns
    ``None``), so every loader built with it, whatever the entry point, has the fix.
    """
    cls = d2_common.MapDataset
    if sys.version_info < (3, 11) or getattr(cls, "_soit_fallback_fixed", False):
        return
    original_init = cls.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if isinstance(getattr(self, "_fallback_candidates", None), set):
            self._fallback_candidates = _IndexableSet(self._fallback_candidates)

    original_getitem = cls.__getitem__

    @functools.wraps(original_getitem)
    def __getitem__(self, idx):
        try:
            return original_getitem(self, idx)
        except ValueError as e:  # random.sample from an empty candidate set
            if len(getattr(self, "_fallback_candidates", ())) == 0:
                raise RuntimeError(
                    f"none of the {len(self._dataset)} images of the dataset could be read or used (each was "
                    "warned about above, naming the file): check the image folder and the file names in the JSON"
                ) from e
            raise

    cls.__init__ = __init__
    cls.__getitem__ = __getitem__
    cls._soit_fallback_fixed = True



def read_image_8bit(file_name: str, format: str = "RGB") -> np.ndarray:
    """Read an image as (H, W, 3) uint8 in ``format`` ("RGB" or "BGR"), EXIF orientation applied.

    Grayscale, palette, RGBA (alpha dropped) and CMYK images are converted by PIL, as in
    detectron2's ``read_image``. 16-bit images (PNG/TIFF modes "I;16*", "I") are mapped
    linearly from the full 16-bit range [0, 65535] to [0, 255]: PIL would clip every value
    above 255, which saturates almost all of a real 16-bit image. Data that uses only a
    small part of the 16-bit range needs its own scaling beforehand (see
    :func:`soit.data.nuclei.prepare_nuclei`); a warning says when an image looks like that.
    """
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        image = ImageOps.exif_transpose(image)
        if image.mode in _HIGH_BIT_MODES:
            values = np.asarray(image).astype(np.float64)
            if values.max() < 256:
                logger.warning(
                    "%s is a 16-bit image whose values are all below 256: it is scaled from the full 16-bit "
                    "range and will look almost black; convert it to 8 bits with a scaling suited to the data",
                    file_name,
                )
            scaled = np.clip(np.round(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
            image = Image.fromarray(scaled)
        return convert_PIL_to_numpy(image, format)


def decode_segmentation(segm, height: int, width: int) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """Rasterise one COCO segmentation at the original image size.

    Args:
        segm: list of polygons ``[[x0, y0, x1, y1, ...], ...]`` (absolute pixels), an RLE dict
            (``counts`` a string/bytes = compressed, a list of ints = uncompressed) or an
            (H, W) binary array.
        height, width: the image size the segmentation refers to.

    Returns:
        ``(mask, None)`` with an (H, W) uint8 mask, or ``(None, reason)`` when it is missing,
        empty, invalid (polygons with fewer than 3 points; RLE run lengths that do not sum
        to height x width, which pycocotools would decode from memory it never wrote) or of
        another size.
    """
    if segm is None:
        return None, EMPTY_MASK
    if isinstance(segm, list):
        polygons = [np.asarray(p, dtype=np.float64).ravel() for p in segm]
        # A polygon needs 3 points; pycocotools rejects shorter ones.
        polygons = [p.tolist() for p in polygons if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return None, EMPTY_MASK
        mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygons, height, width)))
    elif isinstance(segm, dict):
        if tuple(int(s) for s in segm.get("size", ())) != (height, width):
            return None, MASK_SIZE_MISMATCH
        if rle_problem(segm, height, width):  # pycocotools would decode memory it never wrote
            return None, INVALID_RLE
        if isinstance(segm["counts"], list):
            rle = mask_util.frPyObjects(segm, height, width)
        else:
            rle = segm
        mask = mask_util.decode(rle)
    elif isinstance(segm, np.ndarray):
        if segm.shape != (height, width):
            return None, MASK_SIZE_MISMATCH
        mask = (segm > 0).astype(np.uint8)
    else:
        raise ValueError(
            f"unknown segmentation type {type(segm).__name__}: expected a list of polygons, "
            "a COCO RLE dict or a binary (H, W) array"
        )
    if not mask.any():
        return None, EMPTY_MASK
    return mask, None


def mask_to_box(mask: np.ndarray) -> Optional[np.ndarray]:
    """Tight XYXY box of a binary (H, W) mask, x2/y2 exclusive; ``None`` for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


class SOITDatasetMapper:
    """Map one detectron2 dataset dict to the dict SOIT consumes.

    Output: ``image`` (3, H, W) uint8 tensor in ``image_format``; ``height``/``width`` of the
    original image (for resizing predictions back); in training ``instances`` with
    ``gt_boxes`` (Boxes, XYXY absolute pixels of the augmented image), ``gt_classes``
    (int64 contiguous ids) and ``gt_masks`` (BitMasks at the augmented image size).

    In training, crowd annotations, degenerate boxes and empty masks are dropped; each image
    with drops is logged (the file and the count per reason), and cumulative counts live in
    ``num_images``, ``num_kept``, ``num_unreadable`` and ``dropped`` (per data loader worker)
    with a periodic summary in the log. An unreadable image gives ``None`` plus a warning,
    so detectron2's ``MapDataset`` takes another sample; images without annotations are kept.
    """

    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentation: Sequence[Union[T.Augmentation, T.Transform]],
        augmentation_with_crop: Optional[Sequence[Union[T.Augmentation, T.Transform]]] = None,
        image_format: str = "RGB",
        recompute_boxes: bool = True,
        min_box_size: float = 1.0,
        num_classes: Optional[int] = None,
    ):
        """
        Args:
            is_train: training mode (augment, build ``instances``) or inference mode (resize
                only, drop annotations, raise on an unreadable image so that evaluation never
                silently swaps images).
            augmentation: augmentations applied to every image, or (training, with
                ``augmentation_with_crop``) to half of them; see :func:`detr_augmentations`.
            augmentation_with_crop: in training, the list applied to the other half.
            image_format: channel order of the output image, "RGB" (SOIT) or "BGR".
            recompute_boxes: take boxes from the augmented masks (tight, x2/y2 exclusive)
                instead of transforming the annotated boxes.
            min_box_size: drop instances whose augmented box is narrower or lower than this
                (pixels).
            num_classes: when given, category ids must lie in [0, num_classes).
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(
                f"image_format must be 'RGB' or 'BGR' (a 3-channel image for the model), got {image_format!r}"
            )
        # this mapper returns None for unreadable images: detectron2's loader must cope
        patch_map_dataset_fallback()
        self.is_train = is_train
        self.augmentation = T.AugmentationList(list(augmentation))
        self.augmentation_with_crop = (
            T.AugmentationList(list(augmentation_with_crop)) if augmentation_with_crop is not None else None
        )
        self.image_format = image_format
        self.recompute_boxes = recompute_boxes
        self.min_box_size = float(min_box_size)
        self.num_classes = num_classes
        self.num_images = 0
        self.num_kept = 0
        self.num_unreadable = 0
        self.dropped: Counter = Counter()
        self._reported_files = set()  # files whose annotation problems were already warned about

    def __repr__(self):
        return (
            f"SOITDatasetMapper(is_train={self.is_train}, augmentation={self.augmentation}, "
            f"augmentation_with_crop={self.augmentation_with_crop}, image_format={self.image_format!r})"
        )

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        # A shallow copy: the input dict is reused every epoch and must stay unchanged; the
        # annotations are only read.
        dataset_dict = dict(dataset_dict)
        file_name = dataset_dict["file_name"]
        try:
            image = read_image_8bit(file_name, self.image_format)
        except FileNotFoundError:
            raise  # a wrong dataset root, not a bad sample: retrying would hide it
        except _READ_ERRORS as e:
            if not self.is_train:
                raise RuntimeError(f"cannot read image {file_name}: {type(e).__name__}: {e}") from e
            self.num_unreadable += 1
            logger.warning(
                "SOITDatasetMapper: cannot read image %s (%s: %s); skipped, the data loader takes another sample",
                file_name, type(e).__name__, e,
            )
            return None
        check_image_size(dataset_dict, image)
        orig_hw = image.shape[:2]

        augmentation = self.augmentation
        # The DETR recipe: each image takes one of the two branches with probability 1/2.
        # numpy's generator, which detectron2 seeds per data loader worker.
        if self.is_train and self.augmentation_with_crop is not None and np.random.rand() < 0.5:
            augmentation = self.augmentation_with_crop
        aug_input = T.AugInput(image)
        transforms = augmentation(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        annotations = dataset_dict.pop("annotations", None) or []
        if not self.is_train:
            return dataset_dict
        dataset_dict["instances"] = self._annotations_to_instances(
            annotations, transforms, orig_hw, image.shape[:2], file_name
        )
        return dataset_dict

    def _category(self, ann: Dict, file_name: str) -> int:
        cid = ann.get("category_id")
        valid = isinstance(cid, (int, np.integer)) and not isinstance(cid, bool) and cid >= 0
        if valid and self.num_classes is not None:
            valid = cid < self.num_classes
        if not valid:
            bound = self.num_classes if self.num_classes is not None else "num_classes"
            raise ValueError(
                f"{file_name}: category_id {cid!r} is not a contiguous class id in [0, {bound}). The mapper expects "
                "the ids detectron2's register_coco_instances/load_coco_json produce (COCO category ids mapped to "
                "0..num_classes-1); register the dataset with it, or map the ids in your own loader."
            )
        return int(cid)

    def _annotations_to_instances(
        self,
        annotations: List[Dict],
        transforms: T.TransformList,
        orig_hw: Tuple[int, int],
        image_hw: Tuple[int, int],
        file_name: str,
    ) -> Instances:
        """Decode, augment and filter the annotations of one image into ``Instances``."""
        dropped: Counter = Counter()
        boxes, classes, masks = [], [], []
        for ann in annotations:
            category = self._category(ann, file_name)
            if ann.get("iscrowd", 0):
                dropped[CROWD] += 1
                continue
            box = None
            if "bbox" in ann:
                box = BoxMode.convert(list(ann["bbox"]), ann.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS)
                # "not > 0" also catches NaN, which compares false with everything
                if not (np.isfinite(box).all() and box[2] - box[0] > 0 and box[3] - box[1] > 0):
                    dropped[DEGENERATE_BOX] += 1
                    continue
            mask, reason = decode_segmentation(ann.get("segmentation"), *orig_hw)
            if reason is not None:
                dropped[reason] += 1
                continue
            mask = transforms.apply_segmentation(mask)
            if self.recompute_boxes or box is None:
                box = mask_to_box(mask)
            else:
                box = transforms.apply_box(np.array([box], dtype=np.float32))[0]
                box = np.clip(box, 0, [image_hw[1], image_hw[0]] * 2).astype(np.float32)
            if box is None or not mask.any() or min(box[2] - box[0], box[3] - box[1]) < self.min_box_size:
                dropped[LOST_IN_AUGMENTATION] += 1
                continue
            boxes.append(box)
            classes.append(category)
            masks.append(mask)

        self._record(file_name, len(annotations), len(boxes), dropped)
        instances = Instances(image_hw)
        if boxes:
            instances.gt_boxes = Boxes(torch.as_tensor(np.stack(boxes), dtype=torch.float32))
            instances.gt_classes = torch.as_tensor(classes, dtype=torch.int64)
            instances.gt_masks = BitMasks(torch.from_numpy(np.stack(masks)).bool())
        else:
            # Fields with the right shapes, so batching and the criterion need no special case.
            instances.gt_boxes = Boxes(torch.zeros((0, 4), dtype=torch.float32))
            instances.gt_classes = torch.zeros((0,), dtype=torch.int64)
            instances.gt_masks = BitMasks(torch.zeros((0, *image_hw), dtype=torch.bool))
        return instances

    def _record(self, file_name: str, num_annotations: int, num_kept: int, dropped: Counter) -> None:
        """Update the counters and log this image's drops and, now and then, a summary."""
        self.num_images += 1
        self.num_kept += num_kept
        self.dropped.update(dropped)
        if dropped:
            message = "SOITDatasetMapper: %s: kept %d of %d annotations; dropped %s" % (
                file_name, num_kept, num_annotations, ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items())),
            )
            # Annotation problems are warned about once per file (per worker): the same file
            # comes back every epoch. Expected drops and repeats go to the debug log.
            if not set(dropped) <= _EXPECTED_DROPS and file_name not in self._reported_files:
                self._reported_files.add(file_name)
                logger.warning(message)
            else:
                logger.debug(message)
        log_every_n_seconds(logging.INFO, self.summary(), n=_SUMMARY_PERIOD_S, name=__name__)

    def summary(self) -> str:
        """One line with the cumulative counts of this mapper (one data loader worker)."""
        drops = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        return (
            f"SOITDatasetMapper: {self.num_images} images mapped, {self.num_unreadable} unreadable; "
            f"{self.num_kept} annotations kept; dropped {drops}"
        )
