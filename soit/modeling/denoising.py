"""Denoising queries with masks: noised ground truths as extra training-only decoder queries.

DN-DETR (Li et al., CVPR 2022) gives the decoder noised copies of the ground-truth boxes and
labels and trains it to reconstruct the originals, which needs no matching and so steadies
early training; DINO (Zhang et al., ICLR 2023, Sec. 3.3) adds "contrastive" negatives, copies
noised further, which must predict "no object"; Mask DINO (Li et al., CVPR 2023) trains
the masks of the positives too. In SOIT every denoising query generates its own
instance-aware-transformer parameters, so a positive learns its ground truth's mask.
"""
import torch
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

__all__ = ["DenoisingQueries"]


class DenoisingQueries(nn.Module):
    """Builds the denoising queries of a batch and their fixed matches.

    Each of ``groups`` groups holds, per image, one positive per ground truth and (with
    ``contrastive``) one negative per ground truth, padded to the batch's largest count;
    padding slots are negatives. A positive's box corners move by up to ``box_noise`` x
    half the box's width/height, a negative's by ``box_noise`` to 2 x ``box_noise`` of it;
    each label is replaced by a random class with probability ``label_noise``. The content
    query is a learned embedding of the (noised) label.

    Args:
        num_classes: K.
        embed_dim: the decoder's width.
        groups: denoising groups (DN-DETR's "dn number" of copies).
        box_noise: DN-DETR's box noise scale (DINO uses 1.0 with contrastive negatives).
        label_noise: probability of flipping a label.
        contrastive: add DINO's negatives.
        loss_weight: factor of the "_dn" losses.
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        groups: int = 5,
        box_noise: float = 0.4,
        label_noise: float = 0.25,
        contrastive: bool = True,
        loss_weight: float = 1.0,
    ):
        super().__init__()
        if groups < 1 or box_noise < 0 or not 0 <= label_noise <= 1:
            raise ValueError(
                f"DenoisingQueries: groups must be >= 1, box_noise >= 0 and label_noise in [0, 1]; got {groups}, "
                f"{box_noise}, {label_noise}"
            )
        self.num_classes = num_classes
        self.groups = groups
        self.box_noise = box_noise
        self.label_noise = label_noise
        self.contrastive = contrastive
        self.loss_weight = loss_weight
        self.label_embed = nn.Embedding(num_classes, embed_dim)

    def forward(self, targets):
        """
        Args:
            targets: per image "labels" (n,) and "boxes" (n, 4) cxcywh normalised.

        Returns:
            None when no image has a ground truth; else a dict: "query" (B, D, C),
            "reference" (B, D, 4) noised boxes (sigmoid space, no gradient), "groups" G,
            and "matches": per image (query indices, ground-truth indices) of the
            positives, every group's positive of ground truth j matched to j.
        """
        counts = [len(t["labels"]) for t in targets]
        most = max(counts, default=0)
        if most == 0:
            return None
        device = targets[0]["boxes"].device
        per_group = most * (2 if self.contrastive else 1)
        num = self.groups * per_group
        labels = torch.zeros(len(targets), num, dtype=torch.long, device=device)
        boxes = torch.zeros(len(targets), num, 4, device=device)
        boxes[..., :2], boxes[..., 2:] = 0.5, 0.05  # padding slots: a small box, trained as negatives
        matches = []
        for b, t in enumerate(targets):
            n = counts[b]
            src = []
            for g in range(self.groups):
                start = g * per_group
                kinds = [(start, 0.0)] + ([(start + most, 1.0)] if self.contrastive else [])
                for first, extra in kinds:
                    labels[b, first : first + n] = self._noised_labels(t["labels"])
                    boxes[b, first : first + n] = self._noised_boxes(t["boxes"].float(), extra)
                src.append(torch.arange(start, start + n, device=device))
            tgt = torch.arange(n, device=device).repeat(self.groups)
            matches.append((torch.cat(src), tgt))
        return {"query": self.label_embed(labels), "reference": boxes.detach(), "groups": self.groups, "matches": matches}

    def _noised_labels(self, labels):
        flip = torch.rand(labels.shape, device=labels.device) < self.label_noise
        random = torch.randint_like(labels, self.num_classes)
        return torch.where(flip, random, labels)

    def _noised_boxes(self, boxes, extra):
        """Corners moved by (extra + U(0, 1)) x box_noise x half the size, random signs."""
        xyxy = box_cxcywh_to_xyxy(boxes)
        half = boxes[:, 2:].repeat(1, 2) / 2
        sign = torch.randint(0, 2, xyxy.shape, device=boxes.device) * 2.0 - 1.0
        part = torch.rand(xyxy.shape, device=boxes.device) + extra
        xyxy = (xyxy + sign * part * half * self.box_noise).clamp(0.0, 1.0)
        # corners that crossed are swapped; a box keeps at least a sliver of size
        xyxy = torch.cat([torch.minimum(xyxy[:, :2], xyxy[:, 2:]), torch.maximum(xyxy[:, :2], xyxy[:, 2:])], 1)
        cxcywh = box_xyxy_to_cxcywh(xyxy)
        return torch.cat([cxcywh[:, :2], cxcywh[:, 2:].clamp(min=1e-3)], 1)
