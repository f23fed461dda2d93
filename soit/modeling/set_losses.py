"""Training glue: the heads' outputs and the ground truths -> the weighted loss dict.

The criterion matches queries to ground truths, the mask head predicts the masks of the
matched queries (only those: every mask is full-image; docs/model.md, section 6), and the
criterion computes the losses. :class:`SetLosses` owns the bookkeeping of the query groups:
the one-to-one queries (the paper), a one-to-many group (H-DETR) and denoising queries
(DN-DETR, DINO, Mask DINO).
"""
from typing import Dict, List, Optional

import torch
from torch import nn

from ..layers.position_encoding import valid_extent
from .box_ops import box_xyxy_to_cxcywh
from .criterion import matched_queries
from .point_sampling import sample_mask_points

__all__ = ["SetLosses", "prepare_targets", "QUERY_OUTPUTS"]

# per-query outputs of the heads, (Ld, B, Q, ...): what the query groups split
QUERY_OUTPUTS = ("pred_logits", "pred_boxes", "dyn_params")


def prepare_targets(batched_inputs: List[Dict], image_sizes, padded_size, device) -> List[Dict]:
    """Ground truths as the criterion wants them: "labels", "boxes" cxcywh normalised by each
    image's valid size (``image_sizes``, (h, w) each), "masks" zero-padded to the batch's
    ``padded_size`` (Hp, Wp)."""
    Hp, Wp = padded_size
    targets = []
    for x, (h, w) in zip(batched_inputs, image_sizes):
        inst = x["instances"].to(device)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=device)
        cxcywh = box_xyxy_to_cxcywh(inst.gt_boxes.tensor / scale)
        masks = torch.zeros(len(inst), Hp, Wp, dtype=torch.float32, device=device)
        if inst.has("gt_masks") and len(inst):
            gt = inst.gt_masks.tensor if hasattr(inst.gt_masks, "tensor") else inst.gt_masks
            masks[:, : gt.shape[1], : gt.shape[2]] = gt.float()
        targets.append({"labels": inst.gt_classes, "boxes": cxcywh, "masks": masks})
    return targets


class SetLosses:
    """The losses of one training batch.

    Args:
        criterion: a :class:`~soit.modeling.criterion.SetCriterion` (matching and loss math).
        mask_head: the instance-aware mask head, run on the matched queries.
        num_queries: the one-to-one queries; any after them (and after the denoising ones)
            form the one-to-many group.
        denoising_weight: factor of the denoising queries' losses.

    The outputs' queries come in the order the transformer puts them: denoising, one-to-one,
    one-to-many.
    """

    def __init__(self, criterion: nn.Module, mask_head: nn.Module, num_queries: int, denoising_weight: float = 1.0):
        self.criterion = criterion
        self.mask_head = mask_head
        self.num_queries = num_queries
        self.denoising_weight = denoising_weight

    def __call__(self, outputs: Dict, mask_inputs: Dict, targets: List[Dict], denoising: Optional[Dict] = None):
        """Every loss: those of :meth:`query_losses` and, with ``denoising`` (what
        :class:`~soit.modeling.denoising.DenoisingQueries` made for this batch), those of
        :meth:`denoising_losses`."""
        num_dn = 0 if denoising is None else denoising["query"].shape[1]
        losses = self.query_losses(outputs, mask_inputs, targets, num_dn)
        if denoising is not None:
            losses.update(self.denoising_losses(outputs, mask_inputs, targets, denoising))
        return losses

    def query_losses(self, outputs, mask_inputs, targets, num_dn: int = 0):
        """Losses of the one-to-one queries, and of the one-to-many group when the outputs
        hold one: that group is matched against every ground truth repeated
        ``criterion.one2many_repeats`` times and adds the same losses with the suffix
        "_one2many", multiplied by ``criterion.one2many_weight``. The first ``num_dn``
        queries (denoising) are left out."""
        q = self.num_queries
        groups = {k: outputs[k] for k in QUERY_OUTPUTS}
        one2one = dict(outputs, **{k: v[:, :, num_dn : num_dn + q] for k, v in groups.items()})
        losses = self.set_losses(one2one, mask_inputs, targets)
        if outputs["pred_logits"].shape[2] <= num_dn + q:
            return losses
        crit = self.criterion
        one2many = {k: v[:, :, num_dn + q :] for k, v in groups.items()}
        k = crit.one2many_repeats
        repeated = [{"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
        matches = crit.match(one2many, repeated)
        # the i-th copy of ground truth j is ground truth j: masks are not repeated in memory
        counts = [len(t["labels"]) for t in targets]
        matches["layers"] = [
            [(src, tgt % max(n, 1)) for (src, tgt), n in zip(layer, counts)] for layer in matches["layers"]
        ]
        num_gts = crit.num_gts(repeated, one2many["pred_logits"].device)
        extra = self.set_losses(one2many, mask_inputs, targets, matches, num_gts, extra=True)
        losses.update({f"{name}_one2many": crit.one2many_weight * v for name, v in extra.items()})
        return losses

    def denoising_losses(self, outputs, mask_inputs, targets, denoising: Dict):
        """Class, box and mask losses of the denoising queries (suffix "_dn"): each positive
        against the ground truth it was noised from, every other denoising query toward "no
        object"; normalised by the ground truths of all groups."""
        num_dn = denoising["query"].shape[1]
        queries = {k: outputs[k][:, :, :num_dn] for k in QUERY_OUTPUTS}
        num_layers = queries["pred_logits"].shape[0]
        matches = {"layers": [denoising["matches"]] * num_layers, "enc": None}
        num_gts = self.criterion.num_gts(targets, queries["pred_logits"].device) * denoising["groups"]
        losses = self.set_losses(queries, mask_inputs, targets, matches, num_gts, extra=True)
        return {f"{name}_dn": self.denoising_weight * v for name, v in losses.items()}

    def set_losses(self, outputs, mask_inputs, targets, matches=None, num_gts=None, extra: bool = False):
        """Losses of one query set: match (unless given), masks of the matched queries, losses.
        ``extra``: a training-only group (one-to-many, denoising), whose mask losses follow
        ``criterion.extra_mask_loss_layers`` / ``extra_mask_loss_points``."""
        crit = self.criterion
        if matches is None:
            matches = crit.match(outputs, targets)
        layers = crit.mask_layers(outputs["pred_logits"].shape[0], extra=extra)
        if layers:
            index = matched_queries(matches["layers"], layers)
            outputs = dict(outputs, mask_padding=mask_inputs["mask_padding"])
            if extra and crit.extra_mask_loss_points:
                outputs["mask_points"] = self.extra_mask_points(outputs, mask_inputs, index)
                outputs["mask_logits"] = self.matched_mask_logits(outputs, mask_inputs, index, outputs["mask_points"])
            else:
                outputs["mask_logits"] = self.matched_mask_logits(outputs, mask_inputs, index)
        return crit(outputs, targets, matches, num_gts, mask_layers=layers)

    @torch.no_grad()
    def extra_mask_points(self, outputs, mask_inputs, index, chunk: int = 64):
        """(N, P, 2) points of the matched queries in ``index`` where the training-only groups'
        masks are evaluated (``criterion.extra_mask_loss_points``): the least certain of
        their full-map logits (computed ``chunk`` masks at a time without a graph) and
        random ones, as :func:`~soit.modeling.point_sampling.sample_mask_points` chooses."""
        crit, padding = self.criterion, mask_inputs["mask_padding"]
        n = index["query"].numel()
        extent = valid_extent(padding, fraction=True)[index["image"].to(padding.device)]
        points = []
        for s in range(0, n, chunk):
            part = {k: v[s : s + chunk] for k, v in index.items()}
            if crit.mask_loss_importance > 0:
                logits = self.matched_mask_logits(outputs, mask_inputs, part)
            else:  # random points only: the logits are not read
                logits = padding.new_zeros((part["query"].numel(), 1, 1), dtype=torch.float32)
            points.append(
                sample_mask_points(
                    logits.float(), extent[s : s + chunk], crit.extra_mask_loss_points, crit.mask_loss_oversample,
                    crit.mask_loss_importance,
                )  # fmt: skip
            )
        return torch.cat(points) if points else padding.new_zeros((0, crit.extra_mask_loss_points, 2), dtype=torch.float32)

    def matched_mask_logits(self, outputs, mask_inputs, index, points=None):
        """(N, h, w) mask logits of the queries in ``index`` (:func:`matched_queries`), each
        from its own layer's generated parameters and box centre; with ``points`` (N, P, 2),
        (N, P) logits at those points only."""
        feats = mask_inputs["mask_feats"]
        dyn = outputs["dyn_params"]
        if index["query"].numel() == 0:
            # nothing matched: an empty result still connected to the mask branch and F_mask,
            # so that every parameter gets a (zero) gradient
            shape = feats.shape[-2:] if points is None else points.shape[1:2]
            return feats.new_zeros((0, *shape)) + 0.0 * (dyn.sum() + feats.sum())
        at = tuple(i.to(dyn.device) for i in (index["layer"], index["image"], index["query"]))
        args = (feats, mask_inputs["mask_padding"], dyn[at], outputs["pred_boxes"][at][:, :2], at[1])
        if points is not None:
            return self.mask_head.forward_at_points(*args, points, mask_inputs.get("coordinate_scale"))
        return self.mask_head(*args, mask_inputs.get("coordinate_scale"))
