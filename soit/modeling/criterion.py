"""SOIT's training losses: set-prediction (class, box) losses for every decoder layer and
the two-stage encoder proposals, and Dice + BCE mask losses from the instance-aware
transformer for the last decoder layers (paper section "Training", Table 5).

Notation: Ld decoder layers, B images, Q queries, K classes, D dynamic parameters,
(h, w) the padded stride-8 map, N matched instances.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .mask_head import aligned_bilinear

__all__ = ["SetCriterion", "dice_loss", "instance_mask_losses", "mask_valid_pixels", "sigmoid_focal_loss"]

MASK_LOSS_PADDING = ("official", "exclude")


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """Element-wise sigmoid focal loss (Lin et al. 2017), no reduction.

    loss = -alpha_t * (1 - p_t)^gamma * log(p_t), with p_t = p for targets 1 and 1 - p for
    targets 0, alpha_t = alpha for targets 1 and 1 - alpha for targets 0.

    Args:
        logits, targets: same shape; targets in {0, 1} (or soft).
    """
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t).pow(gamma) * ce


def dice_loss(probs, targets, eps=1e-5):
    """Per-instance Dice loss 1 - 2 sum(p t) / (sum(p^2) + sum(t^2) + eps).

    Args:
        probs, targets: (N, ...) probabilities and soft targets.

    Returns:
        (N,).
    """
    probs, targets = probs.flatten(1), targets.flatten(1)
    inter = (probs * targets).sum(1)
    return 1 - 2 * inter / ((probs * probs).sum(1) + (targets * targets).sum(1) + eps)


def mask_valid_pixels(mask_padding, size):
    """Pixels of the upsampled mask map that count as image (not padding).

    The stride-8 padding mask is resized bilinearly (``align_corners=True``) to ``size``
    and every pixel with a non-zero result is padding: a pixel is valid only if its
    interpolation touches no padded stride-8 cell, so up to ~3 pixels (at x4) of real image
    next to the padding border also count as padding. An image without padding is valid
    everywhere. This is the released model's definition (its BCE divides by this count).

    Args:
        mask_padding: (B, h, w) bool, True at padding.
        size: (H, W) of the upsampled map, e.g. (4h, 4w).

    Returns:
        (B, H, W) bool, True where valid.
    """
    pad = F.interpolate(mask_padding[:, None].float(), size=tuple(size), mode="bilinear", align_corners=True)
    return pad[:, 0] == 0


def instance_mask_losses(probs, targets, valid, padding="official"):
    """Dice and BCE of N instance masks, each normalized as in SOIT (before / num_gts).

    Args:
        probs: (N, H, W) predicted probabilities (post-sigmoid).
        targets: (N, H, W) soft targets in [0, 1].
        valid: (N, H, W) bool, valid pixels of each instance's image
            (:func:`mask_valid_pixels`).
        padding: "official": every pixel counts in Dice and BCE, padding included (the
            released model's behaviour); "exclude": predictions and targets in the padding
            are ignored by both losses.

    Returns:
        dice (N,); bce (N,) = BCE summed over the instance's counted pixels divided by the
        number of valid pixels of its image (in both modes).
    """
    if padding not in MASK_LOSS_PADDING:
        raise ValueError(f"mask loss padding must be one of {MASK_LOSS_PADDING}, got {padding!r}")
    probs, targets = probs.float(), targets.float()
    num_valid = valid.flatten(1).sum(1).clamp(min=1)
    if padding == "exclude":
        v = valid.to(probs.dtype)
        probs, targets = probs * v, targets * v
    # BCE on probabilities (log clamped at -100) is what the released model optimises;
    # it is not autocast-safe, hence fp32 with autocast off
    with torch.autocast(device_type=probs.device.type, enabled=False):
        bce = F.binary_cross_entropy(probs, targets, reduction="none")
    if padding == "exclude":
        bce = bce * v
    return dice_loss(probs, targets), bce.flatten(1).sum(1) / num_valid


class SetCriterion(nn.Module):
    """All SOIT training losses, already multiplied by their weights.

    Every loss is summed over the batch and divided by the number of ground truths
    (averaged over processes when torch.distributed is initialised, at least 1).

    Args:
        num_classes: K, class-logit channels.
        matcher: :class:`~soit.modeling.matcher.HungarianMatcher` (or any callable with its
            signature), run per decoder layer and for the encoder proposals.
        mask_head: :class:`~soit.modeling.mask_head.InstanceAwareMaskHead` (no parameters;
            the meta-architecture may share it for inference); None disables mask losses.
        cls_weight, bbox_weight, giou_weight, dice_weight, bce_weight: loss weights.
        focal_alpha, focal_gamma: classification focal loss.
        mask_loss_layers: mask losses on the last this-many decoder layers (paper Table 5);
            None = all, 0 = none.
        mask_loss_padding: "official" (padding counts in Dice and BCE, for parity with the
            released model) or "exclude" (padding ignored); see :func:`instance_mask_losses`.
        mask_upsample: factor from the stride-8 mask logits to the loss resolution (stride 2).
    """

    def __init__(
        self,
        num_classes,
        matcher,
        mask_head=None,
        *,
        cls_weight=2.0,
        bbox_weight=5.0,
        giou_weight=2.0,
        dice_weight=8.0,
        bce_weight=2.0,
        focal_alpha=0.25,
        focal_gamma=2.0,
        mask_loss_layers=None,
        mask_loss_padding="official",
        mask_upsample=4,
    ):
        super().__init__()
        if mask_loss_padding not in MASK_LOSS_PADDING:
            raise ValueError(f"mask_loss_padding must be one of {MASK_LOSS_PADDING}, got {mask_loss_padding!r}")
        if mask_loss_layers is not None and mask_loss_layers < 0:
            raise ValueError(f"mask_loss_layers must be None (all layers) or >= 0, got {mask_loss_layers}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.mask_head = mask_head
        self.cls_weight = cls_weight
        self.bbox_weight = bbox_weight
        self.giou_weight = giou_weight
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.mask_loss_layers = mask_loss_layers
        self.mask_loss_padding = mask_loss_padding
        self.mask_upsample = mask_upsample

    def num_gts(self, targets, device):
        """Ground truths in the batch, averaged over processes, at least 1 (a float)."""
        n = torch.as_tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return n.clamp(min=1).item()

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
        focal = sigmoid_focal_loss(logits.float(), onehot, self.focal_alpha, self.focal_gamma)
        loss_cls = focal.sum() / num_gts

        src_boxes = boxes[batch_idx, src_idx].float()
        loss_bbox = (src_boxes - tgt_boxes).abs().sum() / num_gts
        giou = generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        loss_giou = (1 - giou.diagonal()).sum() / num_gts
        return self.cls_weight * loss_cls, self.bbox_weight * loss_bbox, self.giou_weight * loss_giou

    def mask_losses(self, outputs, targets, matches, layers, mask_inputs, num_gts):
        """Dice and BCE for the given decoder layers, one mask-head call for all of them.

        Returns:
            (dice, bce), each (len(layers),), weighted.
        """
        feats, padding = mask_inputs["mask_feats"], mask_inputs["mask_padding"]
        h, w = feats.shape[-2:]
        size = (self.mask_upsample * h, self.mask_upsample * w)
        dyn, boxes = outputs["dyn_params"], outputs["pred_boxes"]

        # targets of each image resized once, shared by all layers
        offsets, resized, start = [], [], 0
        for t in targets:
            offsets.append(start)
            start += len(t["labels"])
            if len(t["labels"]) > 0:
                resized.append(t["masks"].to(feats.device, torch.float32))
        if resized and len({m.shape[-2:] for m in resized}) != 1:
            raise ValueError(
                "SetCriterion: target masks must all be zero-padded to the padded batch size (H_pad, W_pad); "
                f"got sizes {sorted({tuple(m.shape[-2:]) for m in resized})}"
            )

        params, centers, img_idx, tgt_rows, layer_pos = [], [], [], [], []
        for i, layer in enumerate(layers):
            for b, (src, tgt) in enumerate(matches[layer]):
                params.append(dyn[layer, b, src])
                centers.append(boxes[layer, b, src, :2])
                img_idx.append(torch.full_like(src, b))
                tgt_rows.append(tgt + offsets[b])
                layer_pos.append(torch.full_like(src, i))
        img_idx = torch.cat(img_idx)
        zeros = feats.new_zeros(len(layers), dtype=torch.float32)
        if img_idx.numel() == 0:
            # nothing matched: zero losses that still reach the mask branch and F_mask, so
            # that every parameter gets a gradient (distributed training expects it)
            anchor = 0.0 * (dyn[list(layers)].sum() + feats.sum())
            return zeros + anchor, zeros + anchor

        scale = mask_inputs.get("coordinate_scale")
        extra = {} if scale is None else {"coordinate_scale": scale}
        logits = self.mask_head(feats, padding, torch.cat(params), torch.cat(centers), img_idx, **extra)
        probs = aligned_bilinear(logits[:, None].float(), self.mask_upsample)[:, 0].sigmoid()
        gt = F.interpolate(torch.cat(resized)[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
        valid = mask_valid_pixels(padding, size)
        dice, bce = instance_mask_losses(probs, gt[torch.cat(tgt_rows)], valid[img_idx], self.mask_loss_padding)
        layer_pos = torch.cat(layer_pos)
        dice = zeros.index_add(0, layer_pos, dice) / num_gts
        bce = zeros.index_add(0, layer_pos, bce) / num_gts
        return self.dice_weight * dice, self.bce_weight * bce

    def forward(self, outputs, targets, mask_inputs=None):
        """
        Args:
            outputs: dict with
                "pred_logits": (Ld, B, Q, K) class logits of every decoder layer;
                "pred_boxes": (Ld, B, Q, 4) sigmoid (cx, cy, w, h), normalized to each
                    image's valid (unpadded) size;
                "dyn_params": (Ld, B, Q, D) generated mask-head parameters (needed only
                    with mask losses);
                "enc_logits": (B, S, K) and "enc_boxes": (B, S, 4) two-stage proposals
                    (optional or None: no "_enc" losses).
            targets: list of B dicts with "labels" (n,) long, "boxes" (n, 4) cxcywh
                normalized by the image's valid (w, h), "masks" (n, H_pad, W_pad) float or
                bool, zero-padded to the padded batch image size (needed with mask losses).
            mask_inputs: dict with "mask_feats" (B, C, h, w) F_mask at stride 8 and
                "mask_padding" (B, h, w) bool (True = padding); needed with mask losses;
                optionally "coordinate_scale" (B, 2) for the mask head's encoding.

        Returns:
            dict of weighted scalar losses: "loss_cls", "loss_bbox", "loss_giou",
            "loss_mask_dice", "loss_mask_bce" for the last decoder layer; the same with
            suffix "_{l}" for earlier layers l = 0 .. Ld-2 (mask keys only for the last
            ``mask_loss_layers`` layers); "loss_cls_enc", "loss_bbox_enc", "loss_giou_enc".
        """
        pred_logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        num_layers = pred_logits.shape[0]
        num_gts = self.num_gts(targets, pred_logits.device)
        matches = [self.matcher(pred_logits[l], pred_boxes[l], targets) for l in range(num_layers)]

        def suffix(layer):
            return "" if layer == num_layers - 1 else f"_{layer}"

        losses = {}
        for layer in range(num_layers):
            cls, bbox, giou = self.set_losses(pred_logits[layer], pred_boxes[layer], targets, matches[layer], num_gts)
            s = suffix(layer)
            losses.update({f"loss_cls{s}": cls, f"loss_bbox{s}": bbox, f"loss_giou{s}": giou})

        k = num_layers if self.mask_loss_layers is None else self.mask_loss_layers
        if k > num_layers:
            raise ValueError(f"mask_loss_layers={k} but the decoder has only {num_layers} layers")
        if self.mask_head is not None and k > 0:
            if mask_inputs is None or "dyn_params" not in outputs:
                raise ValueError("mask losses need outputs['dyn_params'] and mask_inputs (mask_feats, mask_padding)")
            layers = list(range(num_layers - k, num_layers))
            dice, bce = self.mask_losses(outputs, targets, matches, layers, mask_inputs, num_gts)
            for i, layer in enumerate(layers):
                s = suffix(layer)
                losses[f"loss_mask_dice{s}"] = dice[i]
                losses[f"loss_mask_bce{s}"] = bce[i]

        if outputs.get("enc_logits") is not None:
            # proposals score objectness only: every ground truth becomes class 0
            binary = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
            enc_matches = self.matcher(outputs["enc_logits"], outputs["enc_boxes"], binary)
            cls, bbox, giou = self.set_losses(outputs["enc_logits"], outputs["enc_boxes"], binary, enc_matches, num_gts)
            losses.update({"loss_cls_enc": cls, "loss_bbox_enc": bbox, "loss_giou_enc": giou})
        return losses
