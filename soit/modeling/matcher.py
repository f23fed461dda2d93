"""Hungarian matching between predictions and ground truths (one-to-one, per image)."""

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher"]


class HungarianMatcher(nn.Module):
    """Minimum-cost bipartite matching of Q predictions to n ground truths per image.

    cost = cost_class * focal class cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU),
    where the focal class cost of the ground truth's class c with p = sigmoid(logit_c) is
    alpha * (1 - p)^gamma * (-log(p + 1e-12)) - (1 - alpha) * p^gamma * (-log(1 - p + 1e-12)):
    the focal loss of calling c positive minus that of calling it negative. Masks are not
    part of the cost.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three terms.
        focal_alpha, focal_gamma: focal-loss parameters of the class term.
    """

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all cost weights are 0; at least one must be positive")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def extra_repr(self):
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
            f"focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}"
        )

    @torch.no_grad()
    def cost_matrix(self, logits, boxes, tgt_labels, tgt_boxes):
        """Matching cost of one image.

        Args:
            logits: (Q, K) class logits.
            boxes: (Q, 4) cxcywh, normalized to the image's valid size.
            tgt_labels: (n,) long in [0, K).
            tgt_boxes: (n, 4) cxcywh, normalized like ``boxes``.

        Returns:
            (Q, n) float32 cost.
        """
        logits, boxes, tgt_boxes = logits.float(), boxes.float(), tgt_boxes.float()
        p = logits.sigmoid()[:, tgt_labels]
        a, g = self.focal_alpha, self.focal_gamma
        pos = a * (1 - p).pow(g) * -(p + 1e-12).log()
        neg = (1 - a) * p.pow(g) * -(1 - p + 1e-12).log()
        cost = self.cost_class * (pos - neg)
        cost = cost + self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return cost - self.cost_giou * giou

    @torch.no_grad()
    def forward(self, pred_logits, pred_boxes, targets):
        """
        Args:
            pred_logits: (B, Q, K) class logits.
            pred_boxes: (B, Q, 4) cxcywh normalized to each image's valid size.
            targets: list of B dicts with "labels" (n,) long and "boxes" (n, 4) cxcywh,
                normalized like the predictions; n may be 0.

        Returns:
            list of B (pred_idx, tgt_idx) pairs of (min(Q, n),) long tensors on the
            predictions' device; pred_idx ascending.
        """
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(f"got {len(targets)} target dicts for a batch of {pred_logits.shape[0]} predictions")
        device = pred_logits.device
        matches = []
        for logits, boxes, tgt in zip(pred_logits, pred_boxes, targets):
            if len(tgt["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.long, device=device)
                matches.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits, boxes, tgt["labels"], tgt["boxes"]).cpu()
            if not torch.isfinite(cost).all():
                raise FloatingPointError(
                    "HungarianMatcher: the cost matrix has NaN/inf entries; check the predicted boxes "
                    "(cxcywh in [0, 1]) and logits for non-finite values"
                )
            rows, cols = linear_sum_assignment(cost.numpy())
            matches.append(
                (
                    torch.as_tensor(rows, dtype=torch.long, device=device),
                    torch.as_tensor(cols, dtype=torch.long, device=device),
                )
            )
        return matches
