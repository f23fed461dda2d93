"""From the heads' outputs to detections: the top-k (query, class) pairs and their masks
(:func:`select_detections`), in the network input size (:func:`instances_at_input_size`, the
part deployment traces) and in the original image size (:func:`detections_at_output_size`,
:func:`soit_postprocess`)."""
import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances
from torch import nn

from .box_ops import box_cxcywh_to_xyxy
from .mask_head import aligned_bilinear

__all__ = ["select_detections", "instances_at_input_size", "detections_at_output_size", "soit_postprocess"]


def select_detections(outputs, mask_inputs, mask_head: nn.Module, max_detections: int):
    """Top-k (query, class) pairs of the last decoder layer and their mask logits.

    Args:
        outputs, mask_inputs: what ``SOIT.forward_heads`` returns.
        mask_head: the model's instance-aware mask head.
        max_detections: k, the pairs kept per image.

    Returns, per image, a dict of "scores" (k,), "labels" (k,), "queries" (k,), "boxes"
    (k, 4) cxcywh normalised to the valid region and "mask_logits" (k, h, w) at the mask
    stride (the padded map). The mask head runs for the kept pairs only, all images in one
    call.
    """
    logits = outputs["pred_logits"][-1]
    B, Q, K = logits.shape
    k = min(max_detections, Q * K)
    scores, index = logits.sigmoid().flatten(1).topk(k, dim=1)
    queries = index // K
    labels = index % K
    boxes = outputs["pred_boxes"][-1].gather(1, queries[..., None].expand(-1, -1, 4))
    dyn = outputs["dyn_params"][-1]
    dyn = dyn.gather(1, queries[..., None].expand(-1, -1, dyn.shape[-1]))
    batch_index = torch.arange(B, device=logits.device).repeat_interleave(k)
    mask_logits = mask_head(
        mask_inputs["mask_feats"], mask_inputs["mask_padding"], dyn.flatten(0, 1), boxes[..., :2].flatten(0, 1),
        batch_index, mask_inputs.get("coordinate_scale"),
    )  # fmt: skip
    mask_logits = mask_logits.view(B, k, *mask_logits.shape[-2:])
    return [
        {"scores": scores[i], "labels": labels[i], "queries": queries[i], "boxes": boxes[i], "mask_logits": mask_logits[i]}
        for i in range(B)
    ]


def instances_at_input_size(result, image_size, mask_stride: int = 8, inference_padding: str = "crop"):
    """One image's detections in the network input size, as ``Instances``: boxes in pixels
    clipped to the image, ``pred_masks`` mask probabilities (k, h, w).

    Args:
        result: one entry of :func:`select_detections`.
        image_size: (h, w) of the network input without the batch padding (ints, or 0-d
            tensors while tracing).
        mask_stride: stride of the mask logits w.r.t. the input.
        inference_padding: "crop": the image's padding is cropped from the mask map before
            resizing; "official": the padded map is resized (``SOIT``'s argument).
    """
    h, w = image_size
    scale = torch.stack([torch.as_tensor(v) for v in (w, h, w, h)]).to(result["boxes"])
    # x clipped to [0, w], y to [0, h]
    boxes = torch.minimum((box_cxcywh_to_xyxy(result["boxes"]) * scale).clamp(min=0), scale)

    logits = result["mask_logits"][None]
    if inference_padding == "crop":
        # the image alone gives a ceil(h / stride)-row map: keep exactly that part, so the
        # batch padding never reaches the upsampling
        s = mask_stride
        logits = logits[..., : (h + s - 1) // s, : (w + s - 1) // s]
    probs = aligned_bilinear(logits, mask_stride // 2).sigmoid()  # half the input resolution
    probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=True)

    # the size as given: while tracing a (2,) tensor, which the exported graph outputs
    inst = Instances(image_size)
    inst.pred_boxes = Boxes(boxes)
    inst.scores = result["scores"]
    inst.pred_classes = result["labels"]
    inst.pred_masks = probs[0]
    return inst


def detections_at_output_size(
    result, image_size, output_size, *, mask_stride: int = 8, inference_padding: str = "crop",
    mask_threshold: float = 0.5, chunk: int = 16,
):  # fmt: skip
    """One image's detections in the original image size (boolean masks): the eager
    composition of :func:`instances_at_input_size` and :func:`soit_postprocess`, run on
    ``chunk`` detections at a time so that the full-size float probabilities of all of them
    never exist at once (100 masks at 800 x 1333 would take 430 MB)."""
    k = len(result["scores"])
    parts = []
    for i in range(0, max(k, 1), chunk):
        part = {key: value[i : i + chunk] for key, value in result.items()}
        inst = instances_at_input_size(part, image_size, mask_stride, inference_padding)
        parts.append(soit_postprocess(inst, output_size[0], output_size[1], mask_threshold))
    return parts[0] if len(parts) == 1 else Instances.cat(parts)


def soit_postprocess(instances: Instances, output_height: int, output_width: int, mask_threshold: float = 0.5):
    """Resize detections in the network input size to the original image size.

    The counterpart of detectron2's ``detector_postprocess`` for full-image masks: boxes are
    scaled, mask probabilities resized (bilinear, corners aligned) and thresholded. It runs
    outside exported graphs, on what ``SOIT.inference`` returns with ``do_postprocess=False``
    (also after an exported model's outputs were unflattened).

    Args:
        instances: ``Instances`` whose ``image_size`` is the network input size and whose
            ``pred_masks`` are probabilities (k, h, w).
        output_height, output_width: the original image size.
        mask_threshold: probability above which a pixel belongs to a mask.

    Returns:
        a new ``Instances`` of size (output_height, output_width) with boolean masks.
    """
    h, w = (int(v) for v in instances.image_size)
    height, width = int(output_height), int(output_width)
    result = Instances((height, width))
    for name, value in instances.get_fields().items():
        result.set(name, value)
    if instances.has("pred_boxes"):
        boxes = Boxes(instances.pred_boxes.tensor.clone())
        boxes.scale(width / w, height / h)
        result.pred_boxes = boxes
    if instances.has("pred_masks"):
        probs = instances.pred_masks
        if probs.dtype == torch.bool:
            raise ValueError("soit_postprocess expects mask probabilities, got boolean pred_masks")
        if (height, width) != (h, w) and len(probs):
            probs = F.interpolate(probs[None].float(), size=(height, width), mode="bilinear", align_corners=True)[0]
        result.pred_masks = probs > mask_threshold
    return result
