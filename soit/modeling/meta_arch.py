"""The SOIT meta-architecture: detectron2 dicts in, a loss dict or ``Instances`` out."""
import copy
import logging
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from ..layers.position_encoding import inverse_sigmoid, valid_extent
from .auto_scale import auto_scale_predict, check_first_look
from .backbone.folded_resnet import maybe_folded_forward
from .box_ops import apply_box_delta, box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from .criterion import matched_queries, sample_mask_points
from .mask_head import aligned_bilinear
from .object_scale import TrainingScale
from .scale_search import check_test_scales, rescale_input, select_scale
from .tiling import TileDetections, paste_masks, tiled_predict
from .transformer import TooFewTokensError

__all__ = ["SOIT", "MLP", "soit_postprocess", "REFERENCE_PARTS"]

# per-query outputs of the heads, (Ld, B, Q, ...): what the query groups split
QUERY_OUTPUTS = ("pred_logits", "pred_boxes", "dyn_params")
# the parts of the model that reference_size makes measure pixels (docs/scale.md)
REFERENCE_PARTS = ("position", "proposals", "queries", "deltas", "mask")
logger = logging.getLogger(__name__)


class MLP(nn.Module):
    """Linear layers with ReLU between them; ``layers.{i}`` are the linears."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


@META_ARCH_REGISTRY.register()
class SOIT(nn.Module):
    """SOIT: a two-stage deformable DETR whose queries also generate an instance-aware
    transformer each, which predicts that instance's mask from shared mask features.

    Data flow (one forward pass): normalise + pad -> backbone (C3..C5) -> neck (F3..F6)
    -> deformable encoder -> two-stage proposals -> decoder with box refinement -> per-layer
    class logits, boxes and dynamic parameters; mask encoder on the P3 memory -> F_mask;
    training: matching -> masks of the matched queries -> losses (:meth:`losses`);
    inference: top-k (query, class) pairs, their masks only, padding cropped, resized to
    the original image.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        in_features: Sequence[str],
        neck: nn.Module,
        transformer: nn.Module,
        mask_encoder: nn.Module,
        mask_head: nn.Module,
        criterion: nn.Module,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "RGB",
        embed_dim: int = 256,
        with_box_refine: bool = True,
        two_stage: bool = True,
        max_detections: int = 100,
        mask_threshold: float = 0.5,
        mask_stride: int = 8,
        inference_padding: str = "crop",
        tile_size: Optional[int] = None,
        tile_overlap: int = 64,
        tile_batch_size: int = 4,
        tile_merge_threshold: float = 0.5,
        test_scales: Sequence[float] = (),
        test_scale_top_k: int = 10,
        auto_scale: bool = False,
        scale_first_look: float = 0.5,
        training_scale: Optional[dict] = None,
        reference_size: int = 0,
        reference_parts: Sequence[str] = REFERENCE_PARTS,
        denoising: Optional[nn.Module] = None,
    ):
        """
        Args:
            backbone: a detectron2 ``Backbone`` (or any module returning a dict of maps).
            in_features: names of the backbone outputs fed to the neck, finest first
                (e.g. ``["res3", "res4", "res5"]``).
            neck: maps the backbone features to the transformer's levels (F3..F6).
            transformer: the deformable encoder/decoder with two-stage proposals.
            mask_encoder: P3 memory -> F_mask (N, C_mask, h, w).
            mask_head: the instance-aware transformer, run from generated parameters.
            criterion: matching and loss math (training only); the model runs the mask
                head on the queries it matched (:meth:`losses`).
            num_classes: number of object classes (sigmoid classification, no background).
            pixel_mean, pixel_std: per-channel normalisation, in ``input_format`` order and
                0-255 units.
            input_format: channel order the model expects ("RGB" for torchvision-style
                weights, as the official release).
            embed_dim: transformer width.
            with_box_refine: per-layer box branches refine the reference boxes; else one
                class/box branch is shared by the decoder layers (Deformable DETR).
            two_stage: proposals from the encoder memory (an extra class/box branch).
            max_detections: top-k (query, class) pairs kept per image.
            mask_threshold: probability above which a pixel belongs to a mask.
            mask_stride: stride of F_mask w.r.t. the input (8: P3).
            inference_padding: "crop" (default) crops each image's padding from the mask map
                before resizing; "official" resizes the padded map like the official release,
                which stretches the masks of images smaller than their batch.
            tile_size: None (default): the training input size decides: a model trained on
                inputs of one size (fixed crops) tiles at that size, one trained on inputs of
                varying size (whole images, the paper) predicts in one pass; a model that does
                not know its training inputs predicts in one pass. 0: one pass. > 0: inference
                cuts images larger than this (pixels of the network input) into overlapping
                tiles of this size, predicts them in batches and merges the instances
                (``soit.modeling.tiling``); a size other than the training one is logged.
                An image smaller than a tile is predicted in a tile-sized canvas of its mean
                colour. Training and export are never tiled.
            tile_overlap: minimal overlap of neighbouring tiles in pixels; at least the
                largest object's size, so that every object is whole in some tile.
            tile_batch_size: tiles per forward pass.
            tile_merge_threshold: intersection over the smaller mask above which two
                detections of different tiles are one object.
            test_scales: () (default, the paper): each image is predicted as it comes. A
                list of factors, e.g. ``(0.5, 1, 2)``: inference predicts each image resized
                by every factor (tiled when ``tile_size`` is set) and keeps, per image, the
                detections of the factor with the highest confidence (the mean of its
                ``test_scale_top_k`` highest scores), in the original coordinates. For test
                images whose objects may be larger or smaller than in training
                (``soit.modeling.scale_search``, ``docs/scale.md``); it costs the sum of
                the squared factors in compute. Training and export are never affected.
            test_scale_top_k: how many of a factor's highest scores its confidence averages.
            auto_scale: False (default, the paper): images are predicted at their own size.
                True: each image is predicted at the magnification that gives its objects
                the size the model was trained on, estimated from a first look at
                ``scale_first_look`` times its size (``soit.modeling.auto_scale``,
                ``docs/scale.md``); needs ``training_scale`` (recorded by training). The
                factor chosen is returned with each image's detections (``"scale"``).
                ``test_scales``, when set, is used instead.
            scale_first_look: magnification of the first look, in (0, 1].
            training_scale: the training inputs' object sizes and input size (a dict, see
                ``soit.modeling.object_scale.TrainingScale``). None (default): recorded when
                training starts and read back from checkpoints; set here it takes precedence
                over a checkpoint's (a difference is logged).
            reference_size: 0 (default, the paper): the encodings, proposal sizes and box
                deltas work in fractions of each image's size. > 0 (pixels): they work in
                units of this size instead (each image's valid size / reference_size
                rescales them), so that an object of a given size in pixels looks the same
                to the model on any image size. A model trained on inputs of exactly this
                size is unchanged by it. See ``docs/scale.md``.
            reference_parts: which parts ``reference_size`` rescales, any of
                :data:`REFERENCE_PARTS`: "position" (encoder sine encoding), "proposals"
                (two-stage proposal sizes), "queries" (box embedding of the two-stage
                queries), "deltas" (centre deltas of proposals and refinement), "mask"
                (the mask head's relative encoding). All by default.
            denoising: None (the paper), or a :class:`~soit.modeling.denoising.DenoisingQueries`:
                in training, noised ground truths become extra decoder queries whose class,
                box and mask losses (suffix "_dn") reconstruct their ground truth (DN-DETR,
                DINO, Mask DINO). Needs ``two_stage``. Inference never runs them.
        """
        super().__init__()
        if inference_padding not in ("crop", "official"):
            raise ValueError(f"inference_padding must be 'crop' or 'official', got {inference_padding!r}")
        self.backbone = backbone
        self.in_features = list(in_features)
        self.neck = neck
        self.transformer = transformer
        self.mask_encoder = mask_encoder
        self.mask_head = mask_head
        self.criterion = criterion
        self.num_classes = num_classes
        self.input_format = input_format
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.max_detections = max_detections
        self.mask_threshold = mask_threshold
        self.mask_stride = mask_stride
        self.inference_padding = inference_padding
        if tile_size is not None and (tile_size < 0 or (tile_size and not 0 <= tile_overlap < tile_size)):
            raise ValueError(
                f"tile_size must be None, 0 or positive and tile_overlap in [0, tile_size), got tile_size={tile_size}, "
                f"tile_overlap={tile_overlap}"
            )
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.tile_batch_size = tile_batch_size
        self.tile_merge_threshold = tile_merge_threshold
        self.test_scales = check_test_scales(test_scales, test_scale_top_k)
        self.test_scale_top_k = test_scale_top_k
        self.auto_scale = bool(auto_scale)
        self.scale_first_look = check_first_look(scale_first_look)
        self.training_scale = TrainingScale.from_dict(training_scale) if training_scale is not None else None
        self.training_scale_from_config = training_scale is not None
        unknown = sorted(set(reference_parts) - set(REFERENCE_PARTS))
        if reference_size < 0 or unknown:
            raise ValueError(
                f"reference_size must be >= 0 and reference_parts a subset of {REFERENCE_PARTS}; got "
                f"reference_size={reference_size}, unknown parts {unknown}"
            )
        self.reference_size = reference_size
        self.reference_parts = tuple(reference_parts)
        if denoising is not None and not two_stage:
            raise ValueError("denoising queries need two_stage=True (their positions are embedded as the proposals')")
        self.denoising = denoising
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

        num_layers = transformer.decoder.num_layers
        cls_branch = nn.Linear(embed_dim, num_classes)
        reg_branch = MLP(embed_dim, embed_dim, 4, 3)
        # focal-loss prior 0.01 for every class; box deltas start at zero
        nn.init.constant_(cls_branch.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(reg_branch.layers[-1].weight)
        nn.init.zeros_(reg_branch.layers[-1].bias)
        num_pred = num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.cls_branches = nn.ModuleList(copy.deepcopy(cls_branch) for _ in range(num_pred))
            self.reg_branches = nn.ModuleList(copy.deepcopy(reg_branch) for _ in range(num_pred))
        else:
            shared = [cls_branch] * num_layers + ([copy.deepcopy(cls_branch)] if two_stage else [])
            self.cls_branches = nn.ModuleList(shared)
            shared = [reg_branch] * num_layers + ([copy.deepcopy(reg_branch)] if two_stage else [])
            self.reg_branches = nn.ModuleList(shared)
        # one mask branch shared by every decoder layer (docs/model.md, section 3)
        self.mask_branch = MLP(embed_dim, embed_dim, mask_head.num_dynamic_params, 3)

    @property
    def device(self):
        return self.pixel_mean.device

    # ------------------------------------------------------------------ input
    def preprocess_image(self, batched_inputs: List[Dict]):
        """Normalise and pad to a batch. Returns the ImageList and the (B, Hp, Wp) bool
        padding mask (True at padding)."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images)
        Hp, Wp = images.tensor.shape[-2:]
        # comparisons, not slice assignments: while tracing the sizes are tensors and the
        # padding must follow them at run time
        ys = torch.arange(Hp, device=self.device)[:, None]
        xs = torch.arange(Wp, device=self.device)[None, :]
        padding = torch.stack([(ys >= h) | (xs >= w) for h, w in images.image_sizes])
        return images, padding

    def prepare_targets(self, batched_inputs, images: ImageList):
        """Ground truths as the criterion wants them: boxes cxcywh normalised by each image's
        valid size, masks zero-padded to the batch size."""
        Hp, Wp = images.tensor.shape[-2:]
        targets = []
        for x, (h, w) in zip(batched_inputs, images.image_sizes):
            inst = x["instances"].to(self.device)
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            cxcywh = box_xyxy_to_cxcywh(inst.gt_boxes.tensor / scale)
            masks = torch.zeros(len(inst), Hp, Wp, dtype=torch.float32, device=self.device)
            if inst.has("gt_masks") and len(inst):
                gt = inst.gt_masks.tensor if hasattr(inst.gt_masks, "tensor") else inst.gt_masks
                masks[:, : gt.shape[1], : gt.shape[2]] = gt.float()
            targets.append({"labels": inst.gt_classes, "boxes": cxcywh, "masks": masks})
        return targets

    # ---------------------------------------------------------------- forward
    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: detectron2 dicts with "image" (C, H, W) in ``input_format``,
                optionally "height" / "width" (the size to return results in) and, for
                training, "instances".

        Returns:
            training: a dict of weighted losses. Inference: one dict per image with
            "instances" in the original image size (see :meth:`inference`).
        """
        if self.training:
            images, padding = self.preprocess_image(batched_inputs)
            targets = self.prepare_targets(batched_inputs, images)
            dn = self.denoising(targets) if self.denoising is not None else None
            outputs, mask_inputs = self._heads(batched_inputs, images, padding, dn)
            losses = self.losses(outputs, mask_inputs, targets, 0 if dn is None else dn["query"].shape[1])
            if dn is not None:
                losses.update(self.denoising_losses(outputs, mask_inputs, targets, dn))
            return losses
        return self.inference(batched_inputs)

    def losses(self, outputs, mask_inputs, targets, num_dn=0):
        """Training as inference runs: the criterion matches queries to ground truths, the
        mask head predicts the masks of the matched queries of the layers with mask losses
        (one call for all of them), the criterion computes the weighted losses.

        With a one-to-many query group (``transformer.num_queries_one2many``, H-DETR), that
        group is matched against every ground truth repeated ``criterion.one2many_repeats``
        times and adds the same losses with the suffix "_one2many", multiplied by
        ``criterion.one2many_weight``. The first ``num_dn`` queries (denoising) are left
        to :meth:`denoising_losses`.
        """
        q = self.transformer.num_queries
        groups = {k: outputs[k] for k in QUERY_OUTPUTS}
        one2one = dict(outputs, **{k: v[:, :, num_dn : num_dn + q] for k, v in groups.items()})
        losses = self._set_losses(one2one, mask_inputs, targets)
        if outputs["pred_logits"].shape[2] <= num_dn + q:
            return losses
        one2many = {k: v[:, :, num_dn + q :] for k, v in groups.items()}
        k = self.criterion.one2many_repeats
        repeated = [{"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
        matches = self.criterion.match(one2many, repeated)
        # the i-th copy of ground truth j is ground truth j: masks are not repeated in memory
        counts = [len(t["labels"]) for t in targets]
        matches["layers"] = [
            [(src, tgt % max(n, 1)) for (src, tgt), n in zip(layer, counts)] for layer in matches["layers"]
        ]
        num_gts = self.criterion.num_gts(repeated, one2many["pred_logits"].device)
        extra = self._set_losses(one2many, mask_inputs, targets, matches, num_gts, extra=True)
        losses.update({f"{name}_one2many": self.criterion.one2many_weight * v for name, v in extra.items()})
        return losses

    def denoising_losses(self, outputs, mask_inputs, targets, dn):
        """Class, box and mask losses of the denoising queries (suffix "_dn"): each positive
        against the ground truth it was noised from, every other denoising query toward "no
        object"; normalised by the ground truths of all groups."""
        num_dn = dn["query"].shape[1]
        queries = {k: outputs[k][:, :, :num_dn] for k in QUERY_OUTPUTS}
        num_layers = queries["pred_logits"].shape[0]
        matches = {"layers": [dn["matches"]] * num_layers, "enc": None}
        num_gts = self.criterion.num_gts(targets, queries["pred_logits"].device) * dn["groups"]
        losses = self._set_losses(queries, mask_inputs, targets, matches, num_gts, extra=True)
        return {f"{name}_dn": self.denoising.loss_weight * v for name, v in losses.items()}

    def _set_losses(self, outputs, mask_inputs, targets, matches=None, num_gts=None, extra=False):
        """Losses of one query set: match (unless given), masks of the matched queries, losses.
        ``extra``: a training-only group (one-to-many, denoising), whose mask losses follow
        ``criterion.extra_mask_loss_layers`` / ``extra_mask_loss_points``."""
        if matches is None:
            matches = self.criterion.match(outputs, targets)
        layers = self.criterion.mask_layers(outputs["pred_logits"].shape[0], extra=extra)
        if layers:
            index = matched_queries(matches["layers"], layers)
            outputs = dict(outputs, mask_padding=mask_inputs["mask_padding"])
            if extra and self.criterion.extra_mask_loss_points:
                outputs["mask_points"] = self.extra_mask_points(outputs, mask_inputs, index)
                outputs["mask_logits"] = self.matched_mask_logits(outputs, mask_inputs, index, outputs["mask_points"])
            else:
                outputs["mask_logits"] = self.matched_mask_logits(outputs, mask_inputs, index)
        return self.criterion(outputs, targets, matches, num_gts, mask_layers=layers)

    @torch.no_grad()
    def extra_mask_points(self, outputs, mask_inputs, index, chunk=64):
        """(N, P, 2) points of the matched queries in ``index`` where the training-only groups'
        masks are evaluated (``criterion.extra_mask_loss_points``): the least certain of
        their full-map logits (computed ``chunk`` masks at a time without a graph) and
        random ones, as :func:`~soit.modeling.criterion.sample_mask_points` chooses."""
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

    def inference(self, batched_inputs: List[Dict], do_postprocess: bool = True):
        """Detections of each image.

        Args:
            batched_inputs: as in :meth:`forward`.
            do_postprocess: True: ``[{"instances": Instances}]`` in each input's "height" x
                "width" (default: the network input size), boolean ``pred_masks``. False: a
                list of ``Instances`` in the network input size with ``pred_masks`` holding
                mask probabilities (k, h, w); :func:`soit_postprocess` finishes them. This
                part is what deployment traces (TracingAdapter): no Python numbers depend on
                the input size, so an exported graph runs at any size.
        """
        if self.test_scales and do_postprocess and not torch.jit.is_tracing():
            return self.scale_search_inference(batched_inputs)
        if self.auto_scale and self.training_scale is not None and do_postprocess and not torch.jit.is_tracing():
            return [
                auto_scale_predict(x, self._predict_one, self.training_scale, self.scale_first_look)
                for x in batched_inputs
            ]
        if self.inference_tile_size and do_postprocess and not torch.jit.is_tracing():
            return self.tiled_inference(batched_inputs)
        images, padding = self.preprocess_image(batched_inputs)
        outputs, mask_inputs = self._heads(batched_inputs, images, padding)
        results = self.select_detections(outputs, mask_inputs)
        if not do_postprocess:
            return [self.instances_at_input_size(r, size) for r, size in zip(results, images.image_sizes)]
        processed = []
        for res, x, size in zip(results, batched_inputs, images.image_sizes):
            output_size = (x.get("height", size[0]), x.get("width", size[1]))
            processed.append({"instances": self.postprocess(res, size, output_size)})
        return processed

    def scale_search_inference(self, batched_inputs: List[Dict]):
        """:meth:`inference` with ``test_scales`` set: each image is predicted at every
        factor (see ``soit.modeling.scale_search``) and the most confident one is kept. A
        factor that makes an image too small for the model is skipped (logged); an image
        too small at every factor is an error."""
        processed = []
        for x in batched_inputs:
            candidates, error = [], None
            for factor in check_test_scales(self.test_scales, self.test_scale_top_k):
                y = rescale_input(x, factor)
                try:
                    candidates.extend(self.tiled_inference([y]) if self.inference_tile_size else self._untiled(y))
                except TooFewTokensError as e:
                    error = e
                    logger.warning(f"test scale {factor:g} skipped: {e}")
            if not candidates:
                raise error
            best = select_scale([c["instances"].scores for c in candidates], self.test_scale_top_k)
            processed.append(candidates[best])
        return processed

    def tiled_inference(self, batched_inputs: List[Dict]):
        """:meth:`inference` with ``tile_size`` set: each image larger than a tile is
        predicted tile by tile (see ``soit.modeling.tiling``); smaller ones in one pass."""
        processed = []
        tile = self.inference_tile_size
        for x in batched_inputs:
            h, w = x["image"].shape[-2:]
            if h <= tile and w <= tile:
                processed.extend(self._untiled(x) if (h, w) == (tile, tile) else self._in_canvas(x, tile))
                continue
            merged = tiled_predict(
                x["image"].to(self.device),
                self._predict_tiles,
                tile_size=tile,
                overlap=min(self.tile_overlap, tile // 2),
                batch_size=self.tile_batch_size,
                merge_threshold=self.tile_merge_threshold,
                max_detections=self.max_detections,
            )
            height, width = x.get("height", h), x.get("width", w)
            inst = Instances((height, width))
            boxes = Boxes(merged["boxes"])
            boxes.scale(width / w, height / h)
            inst.pred_boxes = boxes
            inst.scores = merged["scores"]
            inst.pred_classes = merged["labels"]
            inst.pred_masks = paste_masks(merged["masks"], (height, width))
            processed.append({"instances": inst})
        return processed

    def _in_canvas(self, x: Dict, tile: int):
        """An image smaller than a tile, predicted at the top left of a tile-sized canvas filled
        with its mean colour: the model sees an input of the size it was trained on (its
        positions are fractions of the input, docs/scale.md). Detections centred outside the
        image are dropped, the others cropped to it."""
        image = x["image"].to(self.device)
        c, h, w = image.shape
        canvas = image.float().mean(dim=(1, 2), keepdim=True).expand(c, tile, tile).to(image.dtype).clone()
        canvas[:, :h, :w] = image
        (det,) = self._predict_tiles(canvas[None])
        centres = (det.boxes[:, :2] + det.boxes[:, 2:]) / 2
        masks = det.masks[:, :h, :w]
        keep = (centres[:, 0] < w) & (centres[:, 1] < h) & masks.flatten(1).any(1)
        boxes = det.boxes[keep].clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(max=w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(max=h)
        height, width = x.get("height", h), x.get("width", w)
        inst = Instances((height, width))
        inst.pred_boxes = Boxes(boxes)
        inst.pred_boxes.scale(width / w, height / h)
        inst.scores = det.scores[keep]
        inst.pred_classes = det.labels[keep]
        inst.pred_masks = paste_masks(masks[keep], (height, width))
        return [{"instances": inst}]

    @property
    def inference_tile_size(self) -> int:
        """The tile size inference uses: ``tile_size`` when set, else the training input
        size when every training input had one size, else 0 (one pass)."""
        if self.tile_size is not None:
            return self.tile_size
        known = self.training_scale
        return max(known.input_size) if known is not None and known.input_size else 0

    def set_training_scale(self, scale, source: str):
        """Record what the model was trained on (``source`` names where it comes from); a
        ``training_scale`` set in the config is kept, and a difference logged, as is a
        ``tile_size`` other than the training input size."""
        scale = TrainingScale.from_dict(scale) if scale is not None else None
        if self.training_scale_from_config:
            if scale is not None and scale != self.training_scale:
                logger.warning(
                    f"model.training_scale from the config ({self.training_scale.describe()}) is used; "
                    f"{source} says {scale.describe()}"
                )
            return
        self.training_scale = scale
        if scale is not None and scale.input_size and self.tile_size and self.tile_size != max(scale.input_size):
            logger.warning(
                f"model.tile_size={self.tile_size} but the model was trained on {scale.input_size[0]}x"
                f"{scale.input_size[1]} inputs ({source}); tiles of the training size keep objects where the model "
                "learnt them (unset tile_size to use it)"
            )

    def _predict_one(self, x: Dict):
        """Instances of one input (tiled when inference tiles), in its output size."""
        return (self.tiled_inference([x]) if self.inference_tile_size else self._untiled(x))[0]["instances"]

    def _untiled(self, x: Dict):
        images, padding = self.preprocess_image([x])
        outputs, mask_inputs = self._heads([x], images, padding)
        (res,) = self.select_detections(outputs, mask_inputs)
        size = images.image_sizes[0]
        return [{"instances": self.postprocess(res, size, (x.get("height", size[0]), x.get("width", size[1])))}]

    def _predict_tiles(self, tiles: torch.Tensor) -> List[TileDetections]:
        """(n, C, th, tw) raw tiles (input format, 0-255) -> their detections, tile pixels."""
        images = (tiles.to(torch.float32) - self.pixel_mean) / self.pixel_std
        padding = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        outputs, mask_inputs = self.forward_heads(images, padding)
        size = tuple(images.shape[-2:])
        detections = []
        for res in self.select_detections(outputs, mask_inputs):
            inst = self.instances_at_input_size(res, size)
            detections.append(
                TileDetections(inst.scores, inst.pred_classes, inst.pred_boxes.tensor, inst.pred_masks > self.mask_threshold)
            )
        return detections

    def _heads(self, batched_inputs, images: ImageList, padding: torch.Tensor, denoising=None):
        """:meth:`forward_heads`; an input too small for the queries is named."""
        try:
            return self.forward_heads(images.tensor, padding, denoising)
        except TooFewTokensError as e:
            names = [x.get("file_name", f"input {i}") for i, x in enumerate(batched_inputs)]
            sizes = [f"{w}x{h}" for h, w in images.image_sizes]
            raise TooFewTokensError(
                f"{', '.join(f'{n} ({s})' for n, s in zip(names, sizes))} too small for the model (batch padded "
                f"to {images.tensor.shape[-1]}x{images.tensor.shape[-2]}): {e}"
            ) from e

    def forward_heads(self, images: torch.Tensor, padding: torch.Tensor, denoising: Optional[Dict] = None):
        """Everything from pixels to per-layer predictions (no detectron2 structures).

        Args:
            images: (B, 3, Hp, Wp) normalised, padded batch.
            padding: (B, Hp, Wp) bool, True at padding.
            denoising: training only: denoising queries (:class:`DenoisingQueries` output),
                which come first among the Q queries of the outputs.

        Returns:
            outputs: dict of "pred_logits" (Ld, B, Q, K), "pred_boxes" (Ld, B, Q, 4) cxcywh
                normalised to each image's valid region, "dyn_params" (Ld, B, Q, D),
                "enc_logits" (B, S, K) / "enc_boxes" (B, S, 4) or None.
            mask_inputs: dict of "mask_feats" (B, C_mask, h, w), "mask_padding" (B, h, w).
        """
        # CPU inference folds a ResNet's frozen batch norms into its convolutions (same values)
        features = maybe_folded_forward(self.backbone, images)
        feats = self.neck([features[f] for f in self.in_features])
        masks = [F.interpolate(padding[None].float(), size=f.shape[-2:])[0].to(torch.bool) for f in feats]
        scale = self.coordinate_scale(padding)
        out = self.transformer(
            feats, masks, self.cls_branches, self.reg_branches,
            coordinate_scale=scale, scale_parts=self.reference_parts, denoising=denoising,
        )  # fmt: skip

        hs = out["hs"]  # (Ld, B, Q, C)
        centre_scale = scale[:, None] if scale is not None and "deltas" in self.reference_parts else None
        logits, boxes = [], []
        for lvl in range(hs.shape[0]):
            ref = inverse_sigmoid(out["inter_references"][lvl])
            box = apply_box_delta(ref, self.reg_branches[lvl](hs[lvl]), centre_scale)
            logits.append(self.cls_branches[lvl](hs[lvl]))
            boxes.append(box.sigmoid())
        outputs = {
            "pred_logits": torch.stack(logits),
            "pred_boxes": torch.stack(boxes),
            "dyn_params": self.mask_branch(hs),
            "enc_logits": out.get("enc_outputs_class"),
            "enc_boxes": out.get("enc_outputs_coord"),
        }
        # the mask encoder reads the P3 (finest) part of the memory
        mask_feats = self.mask_encoder(out["memory"], out["pos"], masks[0], out["valid_ratios"])
        mask_inputs = {"mask_feats": mask_feats, "mask_padding": masks[0]}
        if scale is not None and "mask" in self.reference_parts:
            mask_inputs["coordinate_scale"] = scale
        return outputs, mask_inputs

    def coordinate_scale(self, padding: torch.Tensor):
        """(B, 2) (x, y) valid size of each image over ``reference_size``, or None when off."""
        if not self.reference_size:
            return None
        return valid_extent(padding) / self.reference_size

    # -------------------------------------------------------------- inference
    def select_detections(self, outputs, mask_inputs):
        """Top-k (query, class) pairs of the last layer and their mask logits.

        Returns, per image, a dict of "scores" (k,), "labels" (k,), "queries" (k,),
        "boxes" (k, 4) cxcywh normalised to the valid region and "mask_logits" (k, h, w) at
        the mask stride (the padded map). The mask head runs for the kept pairs only, all
        images in one call.
        """
        logits = outputs["pred_logits"][-1]
        B, Q, K = logits.shape
        k = min(self.max_detections, Q * K)
        scores, index = logits.sigmoid().flatten(1).topk(k, dim=1)
        queries = index // K
        labels = index % K
        boxes = outputs["pred_boxes"][-1].gather(1, queries[..., None].expand(-1, -1, 4))
        dyn = outputs["dyn_params"][-1]
        dyn = dyn.gather(1, queries[..., None].expand(-1, -1, dyn.shape[-1]))
        batch_index = torch.arange(B, device=logits.device).repeat_interleave(k)
        mask_logits = self.mask_head(
            mask_inputs["mask_feats"], mask_inputs["mask_padding"], dyn.flatten(0, 1), boxes[..., :2].flatten(0, 1),
            batch_index, mask_inputs.get("coordinate_scale"),
        )  # fmt: skip
        mask_logits = mask_logits.view(B, k, *mask_logits.shape[-2:])
        return [
            {"scores": scores[i], "labels": labels[i], "queries": queries[i], "boxes": boxes[i], "mask_logits": mask_logits[i]}
            for i in range(B)
        ]

    def instances_at_input_size(self, result, image_size):
        """One image's detections in the network input size, as ``Instances``: boxes in
        pixels clipped to the image, ``pred_masks`` mask probabilities (k, h, w).

        Args:
            result: one entry of :meth:`select_detections`.
            image_size: (h, w) of the network input without the batch padding (ints, or
                0-d tensors while tracing).
        """
        h, w = image_size
        scale = torch.stack([torch.as_tensor(v) for v in (w, h, w, h)]).to(result["boxes"])
        # x clipped to [0, w], y to [0, h]
        boxes = torch.minimum((box_cxcywh_to_xyxy(result["boxes"]) * scale).clamp(min=0), scale)

        logits = result["mask_logits"][None]
        if self.inference_padding == "crop":
            # the image alone gives a ceil(h / stride)-row map: keep exactly that part, so the
            # batch padding never reaches the upsampling
            s = self.mask_stride
            logits = logits[..., : (h + s - 1) // s, : (w + s - 1) // s]
        probs = aligned_bilinear(logits, self.mask_stride // 2).sigmoid()  # half the input resolution
        probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=True)

        # the size as given: while tracing a (2,) tensor, which the exported graph outputs
        inst = Instances(image_size)
        inst.pred_boxes = Boxes(boxes)
        inst.scores = result["scores"]
        inst.pred_classes = result["labels"]
        inst.pred_masks = probs[0]
        return inst

    def postprocess(self, result, image_size, output_size, chunk: int = 16):
        """One image's detections in the original image size (boolean masks): the eager
        composition of :meth:`instances_at_input_size` and :func:`soit_postprocess`, run on
        ``chunk`` detections at a time so that the full-size float probabilities of all of
        them never exist at once (100 masks at 800 x 1333 would take 430 MB)."""
        k = len(result["scores"])
        parts = []
        for i in range(0, max(k, 1), chunk):
            part = {key: value[i : i + chunk] for key, value in result.items()}
            inst = self.instances_at_input_size(part, image_size)
            parts.append(soit_postprocess(inst, output_size[0], output_size[1], self.mask_threshold))
        return parts[0] if len(parts) == 1 else Instances.cat(parts)


def soit_postprocess(instances: Instances, output_height: int, output_width: int, mask_threshold: float = 0.5):
    """Resize detections in the network input size to the original image size.

    The counterpart of detectron2's ``detector_postprocess`` for full-image masks: boxes are
    scaled, mask probabilities resized (bilinear, corners aligned) and thresholded. It runs
    outside exported graphs, on what :meth:`SOIT.inference` returns with
    ``do_postprocess=False`` (also after an exported model's outputs were unflattened).

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
