"""Box conversions and (generalized) IoU for the set-prediction losses.

Boxes are (..., 4) tensors, either (cx, cy, w, h) or (x0, y0, x1, y1), in any common unit
(IoU and GIoU are unchanged by scaling each axis, so normalized boxes are fine).
"""

import torch

__all__ = ["apply_box_delta", "box_cxcywh_to_xyxy", "box_iou", "box_xyxy_to_cxcywh", "generalized_box_iou"]


def apply_box_delta(reference_logit, delta, centre_scale=None):
    """A box branch's delta added to a reference in inverse-sigmoid space (Deformable DETR's
    refinement), returned in inverse-sigmoid space (apply ``sigmoid`` for the box).

    Args:
        reference_logit: (..., 4) box or (..., 2) point, inverse sigmoid of (cx, cy[, w, h]).
            A point gets the delta on its centre and the delta's (w, h) as its size.
        delta: (..., 4) the branch's output.
        centre_scale: None, or a tensor broadcastable to (..., 2): the centre deltas are
            divided by it (``SOIT(reference_size=...)``: the image's valid size over the
            reference size, so that a delta moves a centre by the same number of pixels
            whatever the image size).
    """
    centre = delta[..., :2] if centre_scale is None else delta[..., :2] / centre_scale
    if reference_logit.shape[-1] == 4:
        return torch.cat([centre + reference_logit[..., :2], delta[..., 2:] + reference_logit[..., 2:]], -1)
    return torch.cat([centre + reference_logit, delta[..., 2:]], -1)


def box_cxcywh_to_xyxy(boxes):
    """(..., 4) (cx, cy, w, h) -> (..., 4) (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes):
    """(..., 4) (x0, y0, x1, y1) -> (..., 4) (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def _area(boxes):
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes1, boxes2, eps=1e-7):
    """Pairwise IoU of xyxy boxes.

    Args:
        boxes1: (N, 4), boxes2: (M, 4).
        eps: lower bound of the union, so that two empty boxes give IoU 0 instead of NaN
            (only boxes with area below eps are affected).

    Returns:
        iou (N, M), union (N, M).
    """
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = (_area(boxes1)[:, None] + _area(boxes2)[None, :] - inter).clamp(min=eps)
    return inter / union, union


def generalized_box_iou(boxes1, boxes2, eps=1e-7):
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes.

    GIoU = IoU - (|enclosing box| - |union|) / |enclosing box|, in [-1, 1].

    Args:
        boxes1: (N, 4), boxes2: (M, 4), xyxy.
        eps: lower bound of union and enclosing areas (degenerate boxes stay finite).

    Returns:
        (N, M).
    """
    iou, union = box_iou(boxes1, boxes2, eps)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    enclosing = (rb - lt).clamp(min=0).prod(-1).clamp(min=eps)
    return iou - (enclosing - union) / enclosing
