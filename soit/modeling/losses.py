"""Element-wise losses of SOIT's training (docs/model.md, section 6): the classification
losses (focal, and the IoU-aware variants of the training options), Dice, and the mask
losses per instance with the padding rule of each convention."""
import torch
import torch.nn.functional as F

__all__ = [
    "sigmoid_focal_loss",
    "varifocal_loss",
    "ia_bce_loss",
    "dice_loss",
    "mask_valid_pixels",
    "instance_mask_losses",
]

# how the mask losses treat the batch padding (:func:`instance_mask_losses`)
MASK_LOSS_PADDING = ("official", "exclude")


def varifocal_loss(logits, quality, positive, alpha=0.75, gamma=2.0):
    """Element-wise varifocal loss (Zhang et al., "VarifocalNet", CVPR 2021), no reduction.

    Positives (``positive`` True) learn their localisation quality q as the class target,
    weighted by q: -q * (q log p + (1 - q) log(1 - p)); negatives are down-weighted as
    -alpha * p^gamma * log(1 - p).

    Args:
        logits, quality, positive: same shape; quality in [0, 1] (read at positives only).
    """
    p = logits.sigmoid()
    target = torch.where(positive, quality, torch.zeros_like(quality))
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    weight = torch.where(positive, quality, alpha * p.detach().pow(gamma))
    return weight * ce


def ia_bce_loss(logits, quality, positive, alpha=0.25, gamma=2.0):
    """Element-wise IoU-aware BCE (Cai et al., "Align-DETR", 2023), no reduction.

    Positives learn t = s^alpha * u^(1 - alpha), with s their own (detached) score and u the
    localisation quality: -(t log s + (1 - t) log(1 - s)); negatives -s^gamma * log(1 - s).

    Args:
        logits, quality, positive: same shape; quality in [0, 1] (read at positives only).
    """
    s = logits.sigmoid().detach()
    target = torch.where(positive, s.pow(alpha) * quality.clamp(min=0).pow(1 - alpha), torch.zeros_like(s))
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return torch.where(positive, ce, s.pow(gamma) * ce)


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
