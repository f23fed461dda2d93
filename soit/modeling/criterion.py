"""SOIT's training losses: set-prediction (class, box) losses for every decoder layer and
the two-stage encoder proposals, and Dice + BCE mask losses of the instance-aware
transformer's masks for the last decoder layers (paper section "Training", Table 5).

The criterion does loss math only (the element-wise losses in ``losses.py``, point
sampling in ``point_sampling.py``). Training runs (``set_losses.py``): the model's heads ->
:meth:`SetCriterion.match` -> the mask head on the matched queries (:func:`matched_queries`
says which, in which order) -> :meth:`SetCriterion.forward` on logits, boxes and mask logits.

Notation: Ld decoder layers, B images, Q queries, K classes, (h, w) the padded stride-8
map, N matched (layer, query) pairs with a mask loss.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..layers.position_encoding import valid_extent
from .box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou
from .losses import (
    MASK_LOSS_PADDING,
    dice_loss,
    ia_bce_loss,
    instance_mask_losses,
    mask_valid_pixels,
    sigmoid_focal_loss,
    varifocal_loss,
)
from .mask_head import aligned_bilinear
from .point_sampling import point_sample, sample_mask_points

__all__ = ["SetCriterion", "matched_queries"]

CLS_LOSSES = ("focal", "varifocal", "ia_bce")


def matched_queries(matches, layers):
    """The matched queries of the given decoder layers as index tensors, in the order the
    mask logits given to :class:`SetCriterion` must follow: layer by layer, image by image,
    in the matcher's order within an image.

    Args:
        matches: per decoder layer, per image, the matcher's (query indices, ground-truth
            indices).
        layers: decoder layers with mask losses.

    Returns:
        dict of (N,) long tensors: "layer" (decoder layer), "image", "query", "target"
        (ground-truth index within its image).
    """
    rows = {"layer": [], "image": [], "query": [], "target": []}
    for layer in layers:
        for b, (src, tgt) in enumerate(matches[layer]):
            rows["layer"].append(torch.full_like(src, layer))
            rows["image"].append(torch.full_like(src, b))
            rows["query"].append(src)
            rows["target"].append(tgt)
    if not rows["query"]:
        return {k: torch.zeros(0, dtype=torch.long) for k in rows}
    return {k: torch.cat(v) for k, v in rows.items()}


class SetCriterion(nn.Module):
    """All SOIT training losses, already multiplied by their weights.

    Every loss is summed over the batch and divided by the number of ground truths
    (averaged over processes when torch.distributed is initialised, at least 1).

    Args:
        num_classes: K, class-logit channels.
        matcher: :class:`~soit.modeling.matcher.HungarianMatcher` (or any callable with its
            signature), run per decoder layer and for the encoder proposals.
        cls_weight, bbox_weight, giou_weight, dice_weight, bce_weight: loss weights.
        focal_alpha, focal_gamma: classification focal loss (gamma is also the exponent of
            the negatives' weight in "varifocal" and "ia_bce").
        cls_loss: "focal" (the paper: matched (query, class) pairs learn 1), or an IoU-aware
            classification where a matched pair learns its box IoU with the ground truth:
            "varifocal" (VarifocalNet, Zhang et al., CVPR 2021; ``varifocal_alpha``) or
            "ia_bce" (Align-DETR's IoU-aware BCE, Cai et al., 2023: target score^alpha *
            IoU^(1 - alpha), ``ia_bce_alpha``). Applies to every decoder layer and the
            encoder proposals; the matcher's costs are unchanged.
        mask_loss_layers: mask losses on the last this-many decoder layers (paper Table 5);
            None = all, 0 = none.
        mask_loss_padding: "official" (padding counts in Dice and BCE, for parity with the
            released model) or "exclude" (padding ignored); see :func:`instance_mask_losses`.
        mask_upsample: factor from the stride-8 mask logits to the loss resolution (stride 2).
        mask_loss_points: 0 (the paper): Dice and BCE over every pixel of the stride-2 map.
            P > 0: over P points per mask, read bilinearly from the stride-8 logits and the
            full-resolution target (:func:`sample_mask_points`: ``mask_loss_oversample``,
            ``mask_loss_importance``), which cuts the criterion's memory and time when many
            queries have mask losses (PointRend / Mask2Former). The points lie in the image,
            never in the padding, so it needs ``mask_loss_padding="exclude"``.
        one2many_repeats, one2many_weight: for a one-to-many query group
            (``transformer.num_queries_one2many``, H-DETR, Jia et al., CVPR 2023): each
            ground truth is repeated this many times for its matching, and its losses are
            multiplied by the weight (H-DETR: 6 and 1.0). Unused without that group.
        extra_mask_loss_layers: mask losses of the training-only groups (one-to-many and
            denoising queries) on their last this-many decoder layers; None = as
            ``mask_loss_layers``.
        extra_mask_loss_points: 0 = the training-only groups' masks are predicted and
            supervised as the one-to-one queries' are. P > 0: the model evaluates their mask
            head at P points per mask only (``InstanceAwareMaskHead.forward_at_points``;
            uncertain points found on a gradient-free full map, with
            ``mask_loss_oversample`` / ``mask_loss_importance``), so that their memory grows
            with P instead of the image size (PointRend / Mask2Former, applied to the mask
            head itself). Needs ``mask_loss_padding="exclude"``.
    """

    def __init__(
        self,
        num_classes,
        matcher,
        *,
        cls_weight=2.0,
        bbox_weight=5.0,
        giou_weight=2.0,
        dice_weight=8.0,
        bce_weight=2.0,
        focal_alpha=0.25,
        focal_gamma=2.0,
        cls_loss="focal",
        varifocal_alpha=0.75,
        ia_bce_alpha=0.25,
        mask_loss_layers=None,
        mask_loss_padding="official",
        mask_upsample=4,
        mask_loss_points=0,
        mask_loss_oversample=3.0,
        mask_loss_importance=0.75,
        one2many_repeats=6,
        one2many_weight=1.0,
        extra_mask_loss_layers=None,
        extra_mask_loss_points=0,
    ):
        super().__init__()
        if cls_loss not in CLS_LOSSES:
            raise ValueError(f"cls_loss must be one of {CLS_LOSSES}, got {cls_loss!r}")
        if mask_loss_padding not in MASK_LOSS_PADDING:
            raise ValueError(f"mask_loss_padding must be one of {MASK_LOSS_PADDING}, got {mask_loss_padding!r}")
        if mask_loss_points < 0 or mask_loss_oversample < 1 or not 0 <= mask_loss_importance <= 1:
            raise ValueError(
                "mask_loss_points must be >= 0, mask_loss_oversample >= 1 and mask_loss_importance in [0, 1]; got "
                f"{mask_loss_points}, {mask_loss_oversample}, {mask_loss_importance}"
            )
        if extra_mask_loss_points < 0:
            raise ValueError(f"extra_mask_loss_points must be >= 0, got {extra_mask_loss_points}")
        for name, points in (("mask_loss_points", mask_loss_points), ("extra_mask_loss_points", extra_mask_loss_points)):
            if points and mask_loss_padding != "exclude":
                raise ValueError(
                    f"point-sampled mask losses ({name} > 0) sample the image only: they need "
                    f"mask_loss_padding='exclude', got {mask_loss_padding!r}"
                )
        for name, layers in (("mask_loss_layers", mask_loss_layers), ("extra_mask_loss_layers", extra_mask_loss_layers)):
            if layers is not None and layers < 0:
                raise ValueError(f"{name} must be None (all layers) or >= 0, got {layers}")
        if one2many_repeats < 1:
            raise ValueError(f"one2many_repeats must be >= 1, got {one2many_repeats}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.cls_weight = cls_weight
        self.bbox_weight = bbox_weight
        self.giou_weight = giou_weight
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.cls_loss = cls_loss
        self.varifocal_alpha = varifocal_alpha
        self.ia_bce_alpha = ia_bce_alpha
        self.mask_loss_layers = mask_loss_layers
        self.mask_loss_padding = mask_loss_padding
        self.mask_upsample = mask_upsample
        self.mask_loss_points = mask_loss_points
        self.mask_loss_oversample = mask_loss_oversample
        self.mask_loss_importance = mask_loss_importance
        self.one2many_repeats = one2many_repeats
        self.one2many_weight = one2many_weight
        self.extra_mask_loss_layers = extra_mask_loss_layers
        self.extra_mask_loss_points = extra_mask_loss_points

    def num_gts(self, targets, device):
        """Ground truths in the batch, averaged over processes, at least 1 (a float)."""
        n = torch.as_tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return n.clamp(min=1).item()

    def mask_layers(self, num_layers, extra=False):
        """The decoder layers with mask losses: the last ``mask_loss_layers`` of ``num_layers``
        (with ``extra``, of a training-only group: ``extra_mask_loss_layers`` if set)."""
        name, k = "mask_loss_layers", self.mask_loss_layers
        if extra and self.extra_mask_loss_layers is not None:
            name, k = "extra_mask_loss_layers", self.extra_mask_loss_layers
        k = num_layers if k is None else k
        if k > num_layers:
            raise ValueError(f"{name}={k} but the decoder has only {num_layers} layers")
        return list(range(num_layers - k, num_layers))

    @staticmethod
    def _binary(targets):
        # proposals score objectness only: every ground truth becomes class 0
        return [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]

    @torch.no_grad()
    def match(self, outputs, targets):
        """Bipartite matches of every decoder layer ("layers": per layer, per image, (query
        indices, ground-truth indices)) and of the encoder proposals ("enc", None without
        them)."""
        pred_logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        layers = [self.matcher(pred_logits[l], pred_boxes[l], targets) for l in range(pred_logits.shape[0])]
        enc = None
        if outputs.get("enc_logits") is not None:
            enc = self.matcher(outputs["enc_logits"], outputs["enc_boxes"], self._binary(targets))
        return {"layers": layers, "enc": enc}

    def set_losses(self, logits, boxes, targets, matches, num_gts):
        """Focal class, L1 and GIoU losses of one prediction set.

        Args:
            logits: (B, Q, K); boxes: (B, Q, 4) cxcywh normalized; matches from the matcher.

        Returns:
            (loss_cls, loss_bbox, loss_giou), weighted scalars.
        """
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(matches)])
        src_idx = torch.cat([src for src, _ in matches])
        labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, matches)])
        tgt_boxes = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, matches)]).float()

        onehot = torch.zeros_like(logits, dtype=torch.float32)
        onehot[batch_idx, src_idx, labels] = 1.0
        src_boxes = boxes[batch_idx, src_idx].float()
        if self.cls_loss == "focal":
            cls = sigmoid_focal_loss(logits.float(), onehot, self.focal_alpha, self.focal_gamma)
        else:
            # each matched pair's quality: the IoU of its box with its ground truth (a target, no gradient)
            iou = box_iou(box_cxcywh_to_xyxy(src_boxes.detach()), box_cxcywh_to_xyxy(tgt_boxes))[0].diagonal()
            quality = torch.zeros_like(onehot)
            quality[batch_idx, src_idx, labels] = iou
            if self.cls_loss == "varifocal":
                cls = varifocal_loss(logits.float(), quality, onehot > 0, self.varifocal_alpha, self.focal_gamma)
            else:
                cls = ia_bce_loss(logits.float(), quality, onehot > 0, self.ia_bce_alpha, self.focal_gamma)
        loss_cls = cls.sum() / num_gts

        loss_bbox = (src_boxes - tgt_boxes).abs().sum() / num_gts
        giou = generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        loss_giou = (1 - giou.diagonal()).sum() / num_gts
        return self.cls_weight * loss_cls, self.bbox_weight * loss_bbox, self.giou_weight * loss_giou

    def mask_losses(self, mask_logits, mask_padding, targets, matches, layers, num_gts, mask_points=None):
        """Dice and BCE of the matched queries' masks, per layer.

        Args:
            mask_logits: (N, h, w) mask logits at the mask-feature stride, rows in the order
                of :func:`matched_queries` ``(matches, layers)``; or, with ``mask_points``,
                (N, P) logits at those points.
            mask_padding: (B, h, w) bool, True at padding.
            mask_points: None, or (N, P, 2) (x, y) in [0, 1] of the padded map where
                ``mask_logits`` were evaluated: Dice and BCE over those points.

        Returns:
            (dice, bce), each (len(layers),), weighted.
        """
        h, w = mask_padding.shape[-2:]
        size = (self.mask_upsample * h, self.mask_upsample * w)
        index = matched_queries(matches, layers)
        if mask_logits.shape[0] != index["query"].numel():
            raise ValueError(
                f"SetCriterion: {mask_logits.shape[0]} mask logits for {index['query'].numel()} matched queries of "
                f"layers {layers}: the model must run the mask head on matched_queries(matches, layers)"
            )
        device = mask_logits.device
        # targets of each image resized once, shared by all layers
        offsets, resized, start = [], [], 0
        for t in targets:
            offsets.append(start)
            start += len(t["labels"])
            if len(t["labels"]) > 0:
                resized.append(t["masks"].to(device, torch.float32))
        if resized and len({m.shape[-2:] for m in resized}) != 1:
            raise ValueError(
                "SetCriterion: target masks must all be zero-padded to the padded batch size (H_pad, W_pad); "
                f"got sizes {sorted({tuple(m.shape[-2:]) for m in resized})}"
            )
        zeros = mask_logits.new_zeros(len(layers), dtype=torch.float32)
        if mask_logits.shape[0] == 0:
            # nothing matched: zero losses that stay connected to the mask logits (the model
            # keeps them connected to the mask branch and F_mask, so that every parameter
            # gets a gradient, as distributed training expects)
            anchor = 0.0 * mask_logits.sum()
            return zeros + anchor, zeros + anchor

        img_idx = index["image"].to(device)
        rows = index["target"].to(device) + torch.as_tensor(offsets, device=device)[img_idx]
        if mask_points is not None:
            dice, bce = self._losses_at_points(mask_logits.float(), torch.cat(resized)[rows], mask_points)
        elif self.mask_loss_points:
            dice, bce = self._point_losses(mask_logits.float(), torch.cat(resized)[rows], mask_padding[img_idx])
        else:
            probs = aligned_bilinear(mask_logits[:, None].float(), self.mask_upsample)[:, 0].sigmoid()
            gt = F.interpolate(torch.cat(resized)[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
            valid = mask_valid_pixels(mask_padding, size)
            dice, bce = instance_mask_losses(probs, gt[rows], valid[img_idx], self.mask_loss_padding)
        # position of each row's layer among ``layers``
        layer_pos = torch.searchsorted(torch.as_tensor(layers, device=device), index["layer"].to(device))
        dice = zeros.index_add(0, layer_pos, dice) / num_gts
        bce = zeros.index_add(0, layer_pos, bce) / num_gts
        return self.dice_weight * dice, self.bce_weight * bce

    def _point_losses(self, logits, targets, padding):
        """Dice and mean BCE at sampled points of each mask's image (no padding)."""
        extent = valid_extent(padding, fraction=True)
        points = sample_mask_points(
            logits, extent, self.mask_loss_points, self.mask_loss_oversample, self.mask_loss_importance
        )
        return self._losses_at_points(point_sample(logits, points), targets, points)

    @staticmethod
    def _losses_at_points(point_logits, targets, points):
        """Dice and mean BCE of (N, P) logits against (N, H, W) targets read at the points."""
        point_targets = point_sample(targets.float(), points)
        bce = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="none").mean(1)
        return dice_loss(point_logits.sigmoid(), point_targets), bce

    def forward(self, outputs, targets, matches=None, num_gts=None, mask_layers=None):
        """
        Args:
            outputs: dict with
                "pred_logits": (Ld, B, Q, K) class logits of every decoder layer;
                "pred_boxes": (Ld, B, Q, 4) sigmoid (cx, cy, w, h), normalized to each
                    image's valid (unpadded) size;
                "enc_logits" (B, S, K) and "enc_boxes" (B, S, 4): two-stage proposals
                    (optional or None: no "_enc" losses);
                with mask losses, "mask_logits" (N, h, w): the mask head's logits of the
                    matched queries of :meth:`mask_layers`, rows in the order of
                    :func:`matched_queries`, and "mask_padding" (B, h, w) bool (True =
                    padding); optionally "mask_points" (N, P, 2): the logits are (N, P)
                    at these points (:meth:`mask_losses`).
            targets: list of B dicts with "labels" (n,) long, "boxes" (n, 4) cxcywh
                normalized by the image's valid (w, h), "masks" (n, H_pad, W_pad) float or
                bool, zero-padded to the padded batch image size (needed with mask losses).
            matches: what :meth:`match` returned for these outputs (computed when None; the
                mask logits must follow the same matches).
            num_gts: the normaliser of every loss (default: :meth:`num_gts` of ``targets``).
            mask_layers: the decoder layers with mask losses (default :meth:`mask_layers`).

        Returns:
            dict of weighted scalar losses: "loss_cls", "loss_bbox", "loss_giou",
            "loss_mask_dice", "loss_mask_bce" for the last decoder layer; the same with
            suffix "_{l}" for earlier layers l = 0 .. Ld-2 (mask keys only for the last
            ``mask_loss_layers`` layers); "loss_cls_enc", "loss_bbox_enc", "loss_giou_enc".
        """
        pred_logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        num_layers = pred_logits.shape[0]
        if num_gts is None:
            num_gts = self.num_gts(targets, pred_logits.device)
        if matches is None:
            matches = self.match(outputs, targets)

        def suffix(layer):
            return "" if layer == num_layers - 1 else f"_{layer}"

        losses = {}
        for layer in range(num_layers):
            cls, bbox, giou = self.set_losses(
                pred_logits[layer], pred_boxes[layer], targets, matches["layers"][layer], num_gts
            )
            s = suffix(layer)
            losses.update({f"loss_cls{s}": cls, f"loss_bbox{s}": bbox, f"loss_giou{s}": giou})

        layers = self.mask_layers(num_layers) if mask_layers is None else list(mask_layers)
        if layers:
            if outputs.get("mask_logits") is None or outputs.get("mask_padding") is None:
                raise ValueError(
                    "mask losses need outputs['mask_logits'] (the mask head run on matched_queries(matches, "
                    "layers)) and outputs['mask_padding']; mask_loss_layers=0 turns them off"
                )
            dice, bce = self.mask_losses(
                outputs["mask_logits"], outputs["mask_padding"], targets, matches["layers"], layers, num_gts,
                outputs.get("mask_points"),
            )
            for i, layer in enumerate(layers):
                s = suffix(layer)
                losses[f"loss_mask_dice{s}"] = dice[i]
                losses[f"loss_mask_bce{s}"] = bce[i]

        if outputs.get("enc_logits") is not None:
            binary = self._binary(targets)
            enc = matches["enc"] if matches.get("enc") is not None else self.matcher(
                outputs["enc_logits"], outputs["enc_boxes"], binary
            )
            cls, bbox, giou = self.set_losses(outputs["enc_logits"], outputs["enc_boxes"], binary, enc, num_gts)
            losses.update({"loss_cls_enc": cls, "loss_bbox_enc": bbox, "loss_giou_enc": giou})
        return losses
