"""Test-time drivers around a SOIT model, as detectron2's test-time augmentation wraps a
detector: each predicts one image through the model's network (``SOIT.forward_heads``) and
post-processing, and returns its detections in the image's output size.

- :func:`predict_untiled`: one pass at the input's size;
- :func:`predict_tiled`: overlapping tiles of the model's tile size, merged
  (``soit.modeling.tiling``); an image smaller than a tile in a tile-sized canvas;
- :func:`predict_scale_search`: every factor of ``model.test_scales``, the most confident
  kept (``soit.modeling.scale_search``);
- automatic magnification from the training objects' sizes (``soit.modeling.auto_scale``).

:func:`predict` chooses among them as the model's settings say; ``SOIT.inference`` calls it
for eager inference (never while tracing: export runs the plain network).
"""
import logging
from functools import partial
from typing import Dict, List

import torch
from detectron2.structures import Boxes, Instances

from .auto_scale import auto_scale_predict
from .postprocessing import detections_at_output_size, instances_at_input_size, select_detections
from .query_selection import TooFewTokensError
from .scale_search import rescale_input, select_scale
from .tiling import TileDetections, paste_masks, tiled_predict

__all__ = ["uses_driver", "predict", "predict_one", "predict_untiled", "predict_tiled", "predict_scale_search"]
logger = logging.getLogger(__name__)


def uses_driver(model) -> bool:
    """Whether the model's settings ask for more than one plain pass per image."""
    return bool(model.test_scales or (model.auto_scale and model.training_scale is not None) or model.inference_tile_size)


def predict(model, batched_inputs: List[Dict]) -> List[Dict]:
    """``[{"instances": ...}]`` per input, as the model's settings say: ``test_scales``, else
    ``auto_scale`` (with a known training scale), else tiles, else one pass each."""
    if model.test_scales:
        return [{"instances": predict_scale_search(model, x)} for x in batched_inputs]
    if model.auto_scale and model.training_scale is not None:
        predict_at = partial(predict_one, model)
        return [auto_scale_predict(x, predict_at, model.training_scale, model.scale_first_look) for x in batched_inputs]
    return [{"instances": predict_one(model, x)} for x in batched_inputs]


def predict_one(model, x: Dict) -> Instances:
    """One input at its own size: tiled when the model tiles, else one pass."""
    return predict_tiled(model, x) if model.inference_tile_size else predict_untiled(model, x)


def predict_untiled(model, x: Dict) -> Instances:
    """One pass over the whole input."""
    images, padding = model.preprocess_image([x])
    outputs, mask_inputs = model.run_heads([x], images, padding)
    (res,) = select_detections(outputs, mask_inputs, model.mask_head, model.max_detections)
    size = images.image_sizes[0]
    return detections_at_output_size(
        res, size, (x.get("height", size[0]), x.get("width", size[1])), mask_stride=model.mask_stride,
        inference_padding=model.inference_padding, mask_threshold=model.mask_threshold,
    )  # fmt: skip


def predict_tiles(model, tiles: torch.Tensor) -> List[TileDetections]:
    """(n, C, th, tw) raw tiles (input format, 0-255) -> their detections, tile pixels."""
    images = (tiles.to(torch.float32) - model.pixel_mean) / model.pixel_std
    padding = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
    outputs, mask_inputs = model.forward_heads(images, padding)
    size = tuple(images.shape[-2:])
    detections = []
    for res in select_detections(outputs, mask_inputs, model.mask_head, model.max_detections):
        inst = instances_at_input_size(res, size, model.mask_stride, model.inference_padding)
        masks = inst.pred_masks > model.mask_threshold
        detections.append(TileDetections(inst.scores, inst.pred_classes, inst.pred_boxes.tensor, masks))
    return detections


def predict_tiled(model, x: Dict) -> Instances:
    """An image larger than a tile (``model.inference_tile_size``), predicted tile by tile
    and merged; one no larger in one pass, or in a canvas when it is smaller than every
    training input (``model.smaller_than_trained``)."""
    tile = model.inference_tile_size
    h, w = x["image"].shape[-2:]
    if h <= tile and w <= tile:
        return predict_in_canvas(model, x, tile) if model.smaller_than_trained(h, w) else predict_untiled(model, x)
    merged = tiled_predict(
        x["image"].to(model.device),
        partial(predict_tiles, model),
        tile_size=tile,
        overlap=min(model.tile_overlap, tile // 2),
        batch_size=model.tile_batch_size,
        merge_threshold=model.tile_merge_threshold,
        max_detections=model.max_detections,
    )
    height, width = x.get("height", h), x.get("width", w)
    inst = Instances((height, width))
    boxes = Boxes(merged["boxes"])
    boxes.scale(width / w, height / h)
    inst.pred_boxes = boxes
    inst.scores = merged["scores"]
    inst.pred_classes = merged["labels"]
    inst.pred_masks = paste_masks(merged["masks"], (height, width))
    return inst


def predict_in_canvas(model, x: Dict, tile: int) -> Instances:
    """An image smaller than a tile, predicted at the top left of a tile-sized canvas filled
    with its mean colour: the model sees an input of the size it was trained on (its
    positions are fractions of the input, docs/scale.md). Detections centred outside the
    image are dropped, the others cropped to it."""
    image = x["image"].to(model.device)
    c, h, w = image.shape
    canvas = image.float().mean(dim=(1, 2), keepdim=True).expand(c, tile, tile).to(image.dtype).clone()
    canvas[:, :h, :w] = image
    (det,) = predict_tiles(model, canvas[None])
    centres = (det.boxes[:, :2] + det.boxes[:, 2:]) / 2
    masks = det.masks[:, :h, :w]
    keep = (centres[:, 0] < w) & (centres[:, 1] < h) & masks.flatten(1).any(1)
    boxes = det.boxes[keep].clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(max=w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(max=h)
    height, width = x.get("height", h), x.get("width", w)
    inst = Instances((height, width))
    inst.pred_boxes = Boxes(boxes)
    inst.pred_boxes.scale(width / w, height / h)
    inst.scores = det.scores[keep]
    inst.pred_classes = det.labels[keep]
    inst.pred_masks = paste_masks(masks[keep], (height, width))
    return inst


def predict_scale_search(model, x: Dict) -> Instances:
    """The input predicted at every factor of ``model.test_scales`` (tiled when the model
    tiles), the most confident kept (``soit.modeling.scale_search``). A factor that makes the
    image too small for the model is skipped (logged); too small at every factor is an error."""
    candidates, error = [], None
    for factor in model.test_scales:  # checked when the model was built
        try:
            candidates.append(predict_one(model, rescale_input(x, factor)))
        except TooFewTokensError as e:
            error = e
            logger.warning(f"test scale {factor:g} skipped: {e}")
    if not candidates:
        raise error
    return candidates[select_scale([c.scores for c in candidates], model.test_scale_top_k)]
