"""Tiled (sliding-window) inference: cut a large image into overlapping tiles, predict each,
merge the tiles' instances into one set in the image's coordinates.

Why: SOIT's boxes, reference points and position encodings are normalised by the input
size (see ``docs/scale.md``), so a model trained on small crops sees the objects of a much
larger image at the wrong normalised scale. Tiles of the training size keep the model at
the scale it learned, whatever the image size (microscopy slides, aerial scenes).

Merging (no NMS): an object near a tile border appears in two or more tiles, whole in one
and cut in the others when the overlap is at least the object's size. Each detection
whose mask touches a tile side that lies inside the image is marked *cut*. Detections are
then taken whole-before-cut and by decreasing score. One that matches an already kept
detection *of another tile* is a duplicate: same class and, in the part of the image both
tiles see, a mask intersection above ``merge_threshold`` of the smaller mask there. A
duplicate is dropped or, when both are cut (an object larger than the overlap), the two
parts are united. Detections of the same tile are never
merged with each other: the set predictor already made them distinct objects.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["check_tile_options", "tile_windows", "TileDetections", "merge_tile_detections", "tiled_predict", "paste_masks"]


def check_tile_options(tile_size, overlap: int):
    """``tile_size`` (None, 0 or positive) checked against the overlap; returned as given."""
    if tile_size is not None and (tile_size < 0 or (tile_size and not 0 <= overlap < tile_size)):
        raise ValueError(
            f"tile_size must be None, 0 or positive and tile_overlap in [0, tile_size), got tile_size={tile_size}, "
            f"tile_overlap={overlap}"
        )
    return tile_size


def _starts(length: int, tile: int, stride: int) -> List[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)  # the last tile ends at the border
    return starts


def tile_windows(height: int, width: int, tile: int, overlap: int) -> List[Tuple[int, int, int, int]]:
    """Windows ``(y0, x0, y1, x1)`` of size ``min(tile, side)`` covering the image, neighbours
    overlapping by at least ``overlap`` pixels (the last row/column of tiles is moved to end
    at the image border, so it may overlap more).

    Args:
        height, width: image size in pixels.
        tile: tile side in pixels (> overlap).
        overlap: minimal overlap of neighbouring tiles in pixels (>= 0).
    """
    if tile <= 0:
        raise ValueError(f"tile size must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile size={tile}), got {overlap}")
    th, tw = min(tile, height), min(tile, width)
    stride = tile - overlap
    return [(y, x, y + th, x + tw) for y in _starts(height, tile, stride) for x in _starts(width, tile, stride)]


@dataclass
class TileDetections:
    """One tile's detections in that tile's pixel coordinates.

    Attributes:
        scores: (k,) float.
        labels: (k,) long.
        boxes: (k, 4) float, xyxy pixels of the tile.
        masks: (k, th, tw) bool, the tile's size.
    """

    scores: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor


def _touches_inner_side(masks: torch.Tensor, window, height: int, width: int) -> torch.Tensor:
    """(k,) bool: the mask reaches a tile side that is not a border of the image."""
    y0, x0, y1, x1 = window
    cut = torch.zeros(masks.shape[0], dtype=torch.bool, device=masks.device)
    if masks.numel() == 0:
        return cut
    if y0 > 0:
        cut |= masks[:, 0, :].any(1)
    if y1 < height:
        cut |= masks[:, -1, :].any(1)
    if x0 > 0:
        cut |= masks[:, :, 0].any(1)
    if x1 < width:
        cut |= masks[:, :, -1].any(1)
    return cut


@dataclass
class _Kept:
    score: float
    label: int
    box: torch.Tensor  # (4,) xyxy image pixels
    mask: torch.Tensor  # bool, covering `window` of the image
    window: Tuple[int, int, int, int]  # (y0, x0, y1, x1): the tile(s) it came from
    tiles: set
    cut: bool


def _part(mask: torch.Tensor, window, region) -> torch.Tensor:
    """The part of a mask covering ``window`` that lies in ``region`` (inside ``window``)."""
    return mask[region[0] - window[0] : region[2] - window[0], region[1] - window[1] : region[3] - window[1]]


def _agreement(kept: _Kept, mask: torch.Tensor, window) -> float:
    """Where both tiles see the image, the intersection of the two masks over the smaller of
    their areas there: near 1 for one object seen twice (whole or cut), 0 for neighbours."""
    region = (max(kept.window[0], window[0]), max(kept.window[1], window[1]),
              min(kept.window[2], window[2]), min(kept.window[3], window[3]))  # fmt: skip
    if region[0] >= region[2] or region[1] >= region[3]:
        return 0.0
    a, b = _part(kept.mask, kept.window, region), _part(mask, window, region)
    smaller = min(int(a.sum()), int(b.sum()))
    return int((a & b).sum()) / smaller if smaller else 0.0


def _unite(kept: _Kept, mask: torch.Tensor, window, box: torch.Tensor, score: float, tile: int):
    union = (min(kept.window[0], window[0]), min(kept.window[1], window[1]),
             max(kept.window[2], window[2]), max(kept.window[3], window[3]))  # fmt: skip
    united = torch.zeros(union[2] - union[0], union[3] - union[1], dtype=torch.bool, device=mask.device)
    for m, w in ((kept.mask, kept.window), (mask, window)):
        united[w[0] - union[0] : w[2] - union[0], w[1] - union[1] : w[3] - union[1]] |= m
    kept.mask, kept.window = united, union
    kept.box = torch.cat([torch.minimum(kept.box[:2], box[:2]), torch.maximum(kept.box[2:], box[2:])])
    kept.score = max(kept.score, score)
    kept.tiles.add(tile)


def merge_tile_detections(
    detections: Sequence[TileDetections],
    windows: Sequence[Tuple[int, int, int, int]],
    image_size: Tuple[int, int],
    *,
    merge_threshold: float = 0.5,
    max_detections: int = 100,
) -> Dict[str, torch.Tensor]:
    """Merge the detections of every tile into one set (see the module docstring).

    Args:
        detections: one :class:`TileDetections` per window.
        windows: the tiles' ``(y0, x0, y1, x1)`` in the image.
        image_size: (height, width) of the image.
        merge_threshold: two detections of different tiles (same class) are one object when,
            where both tiles see the image, their intersection is more than this fraction of
            the smaller mask there.
        max_detections: the highest-scoring merged detections kept.

    Returns:
        dict of "scores" (n,), "labels" (n,), "boxes" (n, 4) xyxy image pixels, "masks"
        (n, height, width) bool, sorted by decreasing score, n <= max_detections.
    """
    if len(detections) != len(windows):
        raise ValueError(f"{len(detections)} tile results for {len(windows)} windows")
    height, width = image_size
    candidates = []
    for tile, (det, window) in enumerate(zip(detections, windows)):
        y0, x0 = window[0], window[1]
        cut = _touches_inner_side(det.masks, window, height, width)
        offset = torch.tensor([x0, y0, x0, y0], dtype=det.boxes.dtype, device=det.boxes.device)
        for i in range(len(det.scores)):
            candidates.append((bool(cut[i]), -float(det.scores[i]), tile, i, det.boxes[i] + offset))
    candidates.sort(key=lambda c: (c[0], c[1]))  # whole before cut, then by decreasing score

    kept: List[_Kept] = []
    # the kept detections' boxes and labels as tensors: one comparison finds those whose box
    # overlaps a candidate's (only they can be the same object)
    kept_boxes = torch.zeros(len(candidates), 4, dtype=torch.float64)
    kept_labels = torch.zeros(len(candidates), dtype=torch.long)
    for cut, neg_score, tile, i, box in candidates:
        det, window = detections[tile], tuple(windows[tile])
        mask, label = det.masks[i], int(det.labels[i])
        duplicate, b = None, box.to(torch.float64).cpu()
        if kept and mask.any():
            kb = kept_boxes[: len(kept)]
            near = (kept_labels[: len(kept)] == label) & (b[0] < kb[:, 2]) & (b[1] < kb[:, 3])
            near &= (kb[:, 0] < b[2]) & (kb[:, 1] < b[3])
            for j in near.nonzero()[:, 0].tolist():
                if tile not in kept[j].tiles and _agreement(kept[j], mask, window) > merge_threshold:
                    duplicate = j
                    break
        if duplicate is None:
            kept_boxes[len(kept)], kept_labels[len(kept)] = b, label
            kept.append(_Kept(-neg_score, label, box.clone(), mask, window, {tile}, cut))
        elif cut and kept[duplicate].cut:
            _unite(kept[duplicate], mask, window, box, -neg_score, tile)
            kept_boxes[duplicate] = kept[duplicate].box.to(torch.float64)

    kept.sort(key=lambda k: -k.score)
    kept = kept[:max_detections]
    device = detections[0].scores.device if detections else torch.device("cpu")
    masks = torch.zeros(len(kept), height, width, dtype=torch.bool, device=device)
    for j, k in enumerate(kept):
        y0, x0, y1, x1 = k.window
        masks[j, y0:y1, x0:x1] = k.mask
    boxes = torch.stack([k.box for k in kept]) if kept else torch.zeros(0, 4, device=device)
    scale = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=device)
    return {
        "scores": torch.tensor([k.score for k in kept], dtype=torch.float32, device=device),
        "labels": torch.tensor([k.label for k in kept], dtype=torch.long, device=device),
        "boxes": torch.minimum(boxes.clamp(min=0), scale),
        "masks": masks,
    }


def tiled_predict(
    image: torch.Tensor,
    predict: Callable[[torch.Tensor], List[TileDetections]],
    *,
    tile_size: int,
    overlap: int,
    batch_size: int = 4,
    merge_threshold: float = 0.5,
    max_detections: int = 100,
) -> Dict[str, torch.Tensor]:
    """Predict an image tile by tile and merge the results.

    Args:
        image: (C, H, W) the network input.
        predict: takes a (n, C, th, tw) batch of equally sized tiles and returns n
            :class:`TileDetections` in tile coordinates.
        tile_size, overlap: see :func:`tile_windows`.
        batch_size: tiles per ``predict`` call.
        merge_threshold, max_detections: see :func:`merge_tile_detections`.
    """
    height, width = int(image.shape[-2]), int(image.shape[-1])
    windows = tile_windows(height, width, tile_size, overlap)
    detections: List[TileDetections] = []
    for start in range(0, len(windows), max(1, batch_size)):
        chunk = windows[start : start + max(1, batch_size)]
        detections.extend(predict(torch.stack([image[:, y0:y1, x0:x1] for y0, x0, y1, x1 in chunk])))
    return merge_tile_detections(
        detections, windows, (height, width), merge_threshold=merge_threshold, max_detections=max_detections
    )


def paste_masks(masks: torch.Tensor, size: Tuple[int, int], chunk: int = 16) -> torch.Tensor:
    """(k, h, w) bool masks resized to ``size`` (bilinear on 0/1, > 0.5), a few at a time."""
    if tuple(masks.shape[-2:]) == tuple(size) or masks.shape[0] == 0:
        return masks if masks.shape[0] else masks.new_zeros(0, *size)
    out = []
    for part in masks.split(chunk):
        resized = F.interpolate(part[None].float(), size=size, mode="bilinear", align_corners=True)[0]
        out.append(resized > 0.5)
    return torch.cat(out)
