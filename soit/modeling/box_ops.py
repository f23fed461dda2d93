"""Box conversions and (generalized) IoU for the set-prediction losses.

Boxes are (..., 4) tensors, either (cx, cy, w, h) or (x0, y0, x1, y1), in any common unit
(IoU and GIoU are unchanged by scaling each axis, so normalized boxes are fine).
"""

import torch

__all__ = ["box_cxcywh_to_xyxy", "box_iou", "box_xyxy_to_cxcywh", "generalized_box_iou"]


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
