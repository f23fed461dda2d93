"""Pictures of where SOIT looks, from its real forward pass (``tools/visualize_attention.py``).

:func:`attention_of_detections` runs the model once on one image inside
:func:`~soit.layers.ms_deform_attn.recording.record_attention` and returns, for chosen
detections, the points the attention sampled (the tensors handed to the op, turned into
pixels of the image) with their weights:

- the decoder's last layer: the detection's query, per level, head and point;
- the two-stage proposal the query started from and the box it ended with;
- the instance-aware mask head (the detection's own generated layer): the points sampled for
  one pixel inside its mask and one outside;
- the encoder's last layer: the points sampled for the token at one pixel (the box centre).

A location (x, y) in [0, 1] of a level whose map is W_l x H_l at stride s is the input pixel
(x W_l s, y H_l s): for sizes divisible by the largest stride, the location times the input
size. :func:`draw_attention` draws one detection's three panels with detectron2's
``Visualizer``.
"""
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .layers.ms_deform_attn.recording import record_attention
from .modeling.postprocessing import instances_at_input_size, select_detections

__all__ = ["attention_of_detections", "attention_around", "draw_attention", "LEVEL_COLORS"]

# one colour per feature level (strides 8, 16, 32, 64), RGB in [0, 1]
LEVEL_COLORS = ((1.0, 0.85, 0.1), (0.1, 0.9, 1.0), (1.0, 0.3, 0.9), (0.5, 1.0, 0.3))


def _calls_by_part(model, calls):
    names = {id(m): n for n, m in model.named_modules()}
    parts: Dict[str, List] = {"encoder": [], "decoder": [], "mask_encoder": [], "mask_head": []}
    for call in calls:
        name = names.get(id(call.module), "")
        if name.startswith("transformer.encoder"):
            parts["encoder"].append(call)
        elif name.startswith("transformer.decoder"):
            parts["decoder"].append(call)
        elif name.startswith("mask_encoder"):
            parts["mask_encoder"].append(call)
        elif name == "mask_head":
            parts["mask_head"].append(call)
    return parts


def _to_pixels(locations, spatial_shapes, strides):
    """(..., L, P, 2) locations of each level -> input pixels (x W_l s_l, y H_l s_l)."""
    extent = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(locations) * torch.as_tensor(
        strides, dtype=locations.dtype
    )[:, None]
    return locations * extent[:, None, :]


def attention_of_detections(model, image: torch.Tensor, detections: Optional[Sequence[int]] = None, top: int = 3) -> Dict:
    """Run ``model`` (eval mode) once on ``image`` ((3, H, W) in ``model.input_format``, the
    network input) and collect the attention of the chosen detections.

    Args:
        detections: indices into the detections (ordered by score, as the model returns
            them); None: the ``top`` best.

    Returns:
        dict with "instances" (all detections, input size) and "detections": one dict per
        chosen index with "index", "query", "score", "label", "box" (xyxy), "proposal"
        (xyxy), "decoder" {"points" (M, L, P, 2) pixels, "weights" (M, L, P)},
        "mask_head" {"inside"/"outside": {"pixel" (x, y), "points" (M, P, 2),
        "weights" (M, P)}}, "encoder" {"pixel", "points" (M, L, P, 2), "weights"}.
    """
    if model.training:
        raise ValueError("attention_of_detections needs the model in eval mode (call model.eval())")
    H, W = image.shape[-2:]
    images, padding = model.preprocess_image([{"image": image}])
    with torch.no_grad(), record_attention() as calls:
        outputs, mask_inputs = model.forward_heads(images.tensor, padding)
        result = select_detections(outputs, mask_inputs, model.mask_head, model.max_detections)[0]
    inst = instances_at_input_size(result, (H, W), model.mask_stride, model.inference_padding)
    chosen = list(range(min(top, len(inst)))) if detections is None else [int(d) for d in detections]
    bad = [d for d in chosen if not 0 <= d < len(inst)]
    if bad:
        raise ValueError(f"detection index {bad[0]} does not exist: the model returned {len(inst)} detections (0..{len(inst) - 1})")
    parts = _calls_by_part(model, calls)
    levels = parts["decoder"][-1].spatial_shapes
    strides = [model.mask_stride * 2**lvl for lvl in range(len(levels))]
    last, first = parts["decoder"][-1], parts["decoder"][0]
    encoder = parts["encoder"][-1] if parts["encoder"] else None
    head = parts["mask_head"][-1]
    mask_shape = head.spatial_shapes[0]  # (h, w) of the padded stride-8 map
    h_m, w_m = int(mask_shape[0]), int(mask_shape[1])
    scale = torch.tensor([W, H, W, H], dtype=torch.float32)
    found = []
    for d in chosen:
        q = int(result["queries"][d])
        ref = first.reference_points[0, q, 0]
        proposal = ref if ref.numel() == 4 else torch.cat([ref, ref.new_zeros(2)])
        cx, cy, bw, bh = proposal.tolist()
        entry = {
            "index": d, "query": q, "score": float(inst.scores[d]), "label": int(inst.pred_classes[d]),
            "box": inst.pred_boxes.tensor[d].tolist(),
            "proposal": (torch.tensor([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]) * scale).tolist(),
            "decoder": {
                "points": _to_pixels(last.locations[0, q], last.spatial_shapes, strides),
                "weights": last.weights[0, q],
            },
        }  # fmt: skip
        # the mask head: one pixel of the mask map inside the mask (its most certain one) and
        # one outside it (the least certain one within twice the box)
        probs = inst.pred_masks[d]
        x0, y0, x1, y1 = inst.pred_boxes.tensor[d].tolist()
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        around = torch.zeros_like(probs, dtype=torch.bool)
        around[max(0, int(my - (y1 - y0))) : int(my + (y1 - y0)) + 1, max(0, int(mx - (x1 - x0))) : int(mx + (x1 - x0)) + 1] = True
        inside = int(torch.where(probs >= 0.5, probs, torch.full_like(probs, -1)).argmax())
        outside = int(torch.where(around & (probs < 0.5), -probs, torch.full_like(probs, -2)).argmax())
        entry["mask_head"] = {}
        for name, flat in (("inside", inside), ("outside", outside)):
            py, px = divmod(flat, W)
            cell = min(py // model.mask_stride, h_m - 1) * w_m + min(px // model.mask_stride, w_m - 1)
            points = head.locations[d, cell, :, 0] * torch.tensor([w_m, h_m], dtype=torch.float32) * model.mask_stride
            entry["mask_head"][name] = {"pixel": (px, py), "points": points, "weights": head.weights[d, cell, :, 0]}
        if encoder is not None:  # the token of level 0 (stride 8) at the box centre
            w0 = int(encoder.spatial_shapes[0, 1])
            token = min(int(my) // strides[0], int(encoder.spatial_shapes[0, 0]) - 1) * w0 + min(int(mx) // strides[0], w0 - 1)
            entry["encoder"] = {
                "pixel": (mx, my),
                "points": _to_pixels(encoder.locations[0, token], encoder.spatial_shapes, strides),
                "weights": encoder.weights[0, token],
            }
        found.append(entry)
    return {"instances": inst, "detections": found}


def attention_around(model, image: torch.Tensor, box: Sequence[float], size: Sequence[int]):
    """The attention of a detection made by an inference that did not see ``image`` in one
    pass (tiles, another magnification), in the view a model trained on fixed-size inputs
    knows: the window of ``size`` (h, w) centred on ``box`` (xyxy, pixels of ``image``),
    clamped to the image, is run once and its detection that overlaps ``box`` most is chosen.

    Returns:
        ``(offset, found, entry)``: the window's top-left (x, y) in ``image``, the result of
        :func:`attention_of_detections` on the window (coordinates of the window; every
        detection's entry in "detections") and the chosen entry, or None when nothing in the
        window overlaps ``box``.
    """
    from detectron2.structures import Boxes, pairwise_iou

    H, W = image.shape[-2:]
    h, w = min(int(size[0]), H), min(int(size[1]), W)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x0 = int(round(min(max(cx - w / 2, 0), W - w)))
    y0 = int(round(min(max(cy - h / 2, 0), H - h)))
    found = attention_of_detections(model, image[:, y0 : y0 + h, x0 : x0 + w], top=model.max_detections)
    if not found["detections"]:
        return (x0, y0), found, None
    shifted = torch.tensor([[box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0]], dtype=torch.float32)
    iou = pairwise_iou(Boxes(shifted), Boxes(found["instances"].pred_boxes.tensor.float().cpu()))[0]
    best = int(iou.argmax())
    entry = next((e for e in found["detections"] if e["index"] == best), None)
    return (x0, y0), found, entry if float(iou[best]) > 0 else None


def _dots(vis, points, weights, colors, radius):
    """Points (..., L, P, 2) or (..., P, 2) as circles: colour per level, radius by weight."""
    points = points.reshape(-1, points.shape[-3] if points.dim() >= 4 else 1, points.shape[-2], 2)
    weights = weights.reshape(points.shape[:-1])
    top = float(weights.max()) if weights.numel() else 1.0
    for head_points, head_weights in zip(points, weights):
        for lvl, (level_points, level_weights) in enumerate(zip(head_points, head_weights)):
            for (x, y), w in zip(level_points.tolist(), level_weights.tolist()):
                vis.draw_circle((x, y), color=colors[lvl % len(colors)], radius=max(1.0, radius * (w / top) ** 0.5))


def draw_attention(image_rgb: np.ndarray, entry: Dict, instances, metadata=None, radius: float = 6.0) -> np.ndarray:
    """Three panels side by side (RGB uint8): (1) the detection's mask and box, the proposal
    it started from (dashed) and the decoder's last-layer sampling points (colour = level,
    size = weight); (2) the mask head's points for a pixel inside (green) and outside (red)
    the mask; (3) the encoder's points for the token at the box centre."""
    from detectron2.utils.colormap import colormap
    from detectron2.utils.visualizer import Visualizer

    colours = getattr(metadata, "thing_colors", None) if metadata is not None else None
    colour = np.array(colours[entry["label"]]) / 255.0 if colours else colormap(rgb=True, maximum=1)[entry["label"] % 74]
    mask = instances.pred_masks[entry["index"]].numpy() >= 0.5
    names = getattr(metadata, "thing_classes", None) if metadata is not None else None
    label = f"{names[entry['label']] if names else entry['label']} {entry['score']:.2f} (query {entry['query']})"
    panels = []
    titles = {"decoder": "decoder, last layer", "mask_head": "mask head: in / out", "encoder": "encoder, box centre"}
    for panel in ("decoder", "mask_head", "encoder"):
        vis = Visualizer(image_rgb, metadata)
        vis.draw_text(titles[panel], (3, 1), horizontal_alignment="left", color=(1.0, 1.0, 1.0), font_size=8)
        vis.draw_binary_mask(mask, color=colour, alpha=0.3)
        vis.draw_box(entry["box"], edge_color=colour)
        if panel == "decoder":
            vis.draw_box(entry["proposal"], edge_color=(1.0, 1.0, 1.0), line_style="--")
            _dots(vis, entry["decoder"]["points"], entry["decoder"]["weights"], LEVEL_COLORS, radius)
            vis.draw_text(label, (entry["box"][0], entry["box"][1]), horizontal_alignment="left", color=colour)
        elif panel == "mask_head":
            for name, dot in (("inside", (0.1, 1.0, 0.2)), ("outside", (1.0, 0.2, 0.2))):
                part = entry["mask_head"][name]
                for x, y in part["points"].reshape(-1, 2).tolist():
                    vis.draw_line([part["pixel"][0], x], [part["pixel"][1], y], color=dot, linewidth=0.8)
                _dots(vis, part["points"], part["weights"], [dot], radius)
                vis.draw_circle(part["pixel"], color=(1.0, 1.0, 1.0), radius=2)
        elif "encoder" in entry:
            _dots(vis, entry["encoder"]["points"], entry["encoder"]["weights"], LEVEL_COLORS, radius)
            vis.draw_circle(entry["encoder"]["pixel"], color=(1.0, 1.0, 1.0), radius=3)
        panels.append(vis.get_output().get_image())
    gap = np.full((panels[0].shape[0], 4, 3), 255, dtype=np.uint8)
    return np.concatenate([p for pair in zip(panels, [gap, gap, None]) for p in pair if p is not None], 1)
