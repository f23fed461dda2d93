"""The SOIT meta-architecture: detectron2 dicts in, a loss dict or ``Instances`` out."""
import copy
import logging
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList
from torch import nn

from ..layers.mlp import MLP
from ..layers.position_encoding import inverse_sigmoid, valid_extent
from . import test_time
from .activation_checkpointing import set_activation_checkpointing
from .auto_scale import check_first_look
from .backbone.folded_resnet import maybe_folded_forward
from .box_ops import apply_box_delta
from .object_scale import TrainingScale
from .postprocessing import detections_at_output_size, instances_at_input_size, select_detections, soit_postprocess
from .query_selection import TooFewTokensError
from .scale_search import check_test_scales
from .set_losses import SetLosses, prepare_targets
from .tiling import check_tile_options

__all__ = ["SOIT", "MLP", "soit_postprocess", "REFERENCE_PARTS"]

# the parts of the model that reference_size makes measure pixels (docs/scale.md)
REFERENCE_PARTS = ("position", "proposals", "queries", "deltas", "mask")
logger = logging.getLogger(__name__)


def prediction_branches(embed_dim: int, num_classes: int, num_layers: int, two_stage: bool, box_refine: bool):
    """The class and box branches of the decoder layers (and of the two-stage proposals, the
    last ones): one per layer with box refinement, else one shared by the decoder layers
    (Deformable DETR). Focal-loss prior 0.01 for every class; box deltas start at zero."""
    cls_branch = nn.Linear(embed_dim, num_classes)
    reg_branch = MLP(embed_dim, embed_dim, 4, 3)
    nn.init.constant_(cls_branch.bias, -math.log((1 - 0.01) / 0.01))
    nn.init.zeros_(reg_branch.layers[-1].weight)
    nn.init.zeros_(reg_branch.layers[-1].bias)
    extra = 1 if two_stage else 0
    if box_refine:
        cls = [copy.deepcopy(cls_branch) for _ in range(num_layers + extra)]
        reg = [copy.deepcopy(reg_branch) for _ in range(num_layers + extra)]
    else:
        cls = [cls_branch] * num_layers + [copy.deepcopy(cls_branch)] * extra
        reg = [reg_branch] * num_layers + [copy.deepcopy(reg_branch)] * extra
    return nn.ModuleList(cls), nn.ModuleList(reg)


@META_ARCH_REGISTRY.register()
class SOIT(nn.Module):
    """SOIT: a two-stage deformable DETR whose queries also generate an instance-aware
    transformer each, which predicts that instance's mask from shared mask features.

    Data flow (one forward pass): normalise + pad -> backbone (C3..C5) -> neck (F3..F6)
    -> deformable encoder -> two-stage proposals -> decoder with box refinement -> per-layer
    class logits, boxes and dynamic parameters; mask encoder on the P3 memory -> F_mask;
    training: matching -> masks of the matched queries -> losses (``set_losses.py``);
    inference: top-k (query, class) pairs, their masks only, padding cropped, resized to
    the original image (``postprocessing.py``), one pass per image or through the
    test-time drivers of ``test_time.py`` (tiles, magnification).
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
        scale_first_look: float = 1.0,
        training_scale: Optional[dict] = None,
        reference_size: int = 0,
        reference_parts: Sequence[str] = REFERENCE_PARTS,
        denoising: Optional[nn.Module] = None,
        activation_checkpointing: Sequence[str] = (),
        attention_fp32: bool = False,
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
            criterion: matching and loss math (training only; :meth:`set_losses`).
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
            tile_size: None (default): the training inputs decide: an image larger than the
                largest training input is cut into tiles of that size (a model trained on
                fixed crops tiles at its crop size), one within the training sizes (whole
                images, the paper's resized inputs) is predicted in one pass, one smaller
                than every training input in a canvas; a model that does not know its
                training inputs predicts in one pass. 0: one pass. > 0: inference
                cuts images larger than this (pixels of the network input) into overlapping
                tiles of this size, predicts them in batches and merges the instances
                (``soit.modeling.tiling``); a size other than the training one is logged.
                Set by hand, an image smaller than a tile is predicted in a tile-sized
                canvas of its mean colour. Training and export are never tiled.
            tile_overlap: minimal overlap of neighbouring tiles in pixels; at least the
                largest object's size, so that every object is whole in some tile.
            tile_batch_size: tiles per forward pass.
            tile_merge_threshold: intersection over the smaller mask above which two
                detections of different tiles are one object.
            test_scales: () (default, the paper): each image is predicted as it comes.
                Factors, e.g. ``(0.5, 1, 2)``: each image is predicted at every factor and the
                most confident factor's detections (mean of its ``test_scale_top_k`` best
                scores) are kept (``soit.modeling.scale_search``, ``docs/scale.md``; costs
                the sum of the squared factors). Training and export are never affected.
            test_scale_top_k: how many of a factor's highest scores its confidence averages.
            auto_scale: False (default, the paper): images are predicted at their own size.
                True: each image is predicted at the magnification that gives its objects
                the size the model was trained on, estimated from a first look at
                ``scale_first_look`` times its size (``soit.modeling.auto_scale``,
                ``docs/scale.md``); needs ``training_scale`` (recorded by training). The
                factor chosen is returned with each image's detections (``"scale"``).
                ``test_scales``, when set, is used instead.
            scale_first_look: magnification of the first look, in (0, 1] (1: the image's own
                size, which is then the prediction when its objects have the trained sizes;
                lower it for objects more than about twice the trained sizes).
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
            activation_checkpointing: parts recomputed in the backward pass instead of
                keeping their activations, any of "backbone", "encoder", "mask_encoder",
                "decoder", "mask_head" (``soit.modeling.activation_checkpointing``).
            attention_fp32: under autocast, the deformable attention samples in float32.
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
        self.max_detections = max_detections
        self.mask_threshold = mask_threshold
        self.mask_stride = mask_stride
        self.inference_padding = inference_padding
        self.tile_size = check_tile_options(tile_size, tile_overlap)
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
        if denoising is not None and not (two_stage and transformer.two_stage):
            raise ValueError("denoising queries need two_stage=True (their positions are embedded as the proposals')")
        self.denoising = denoising
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

        self.cls_branches, self.reg_branches = prediction_branches(
            embed_dim, num_classes, transformer.decoder.num_layers, two_stage, with_box_refine
        )
        # one mask branch shared by every decoder layer (docs/model.md, section 3)
        self.mask_branch = MLP(embed_dim, embed_dim, mask_head.num_dynamic_params, 3)
        self.activation_checkpointing = set_activation_checkpointing(self, activation_checkpointing)
        for module in self.modules():  # the deformable attention layers and the mask head
            if hasattr(module, "attention_fp32"):
                module.attention_fp32 = bool(attention_fp32)

    @property
    def device(self):
        return self.pixel_mean.device

    # ------------------------------------------------------------------ input
    def preprocess_image(self, batched_inputs: List[Dict]):
        """Normalise and pad to a batch. Returns the ImageList and the (B, Hp, Wp) bool
        padding mask (True at padding). The batch is padded to the backbone's
        ``size_divisibility`` (0 for ResNet: no extra padding; Swin's patch size)."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        Hp, Wp = images.tensor.shape[-2:]
        # comparisons, not slice assignments: while tracing the sizes are tensors and the
        # padding must follow them at run time
        ys = torch.arange(Hp, device=self.device)[:, None]
        xs = torch.arange(Wp, device=self.device)[None, :]
        padding = torch.stack([(ys >= h) | (xs >= w) for h, w in images.image_sizes])
        return images, padding

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
            targets = prepare_targets(batched_inputs, images.image_sizes, images.tensor.shape[-2:], self.device)
            dn = self.denoising(targets) if self.denoising is not None else None
            outputs, mask_inputs = self.run_heads(batched_inputs, images, padding, dn)
            return self.set_losses()(outputs, mask_inputs, targets, dn)
        return self.inference(batched_inputs)

    def set_losses(self) -> SetLosses:
        """The training losses of this model's outputs (``soit.modeling.set_losses``): its
        criterion, mask head, query groups and denoising weight."""
        weight = self.denoising.loss_weight if self.denoising is not None else 1.0
        return SetLosses(self.criterion, self.mask_head, self.transformer.num_queries, weight)

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
        if do_postprocess and not torch.jit.is_tracing() and test_time.uses_driver(self):
            return test_time.predict(self, batched_inputs)  # tiles, magnification (soit.modeling.test_time)
        images, padding = self.preprocess_image(batched_inputs)
        outputs, mask_inputs = self.run_heads(batched_inputs, images, padding)
        results = select_detections(outputs, mask_inputs, self.mask_head, self.max_detections)
        if not do_postprocess:
            return [
                instances_at_input_size(r, size, self.mask_stride, self.inference_padding)
                for r, size in zip(results, images.image_sizes)
            ]
        processed = []
        for res, x, size in zip(results, batched_inputs, images.image_sizes):
            output_size = (x.get("height", size[0]), x.get("width", size[1]))
            inst = detections_at_output_size(
                res, size, output_size, mask_stride=self.mask_stride, inference_padding=self.inference_padding,
                mask_threshold=self.mask_threshold,
            )  # fmt: skip
            processed.append({"instances": inst})
        return processed

    @property
    def inference_tile_size(self) -> int:
        """The tile size inference uses: ``tile_size`` when set, else the longer side of the
        largest training input (the crop size of a model trained on crops), else 0 (one
        pass). Only an image larger than a tile is cut into tiles."""
        if self.tile_size is not None:
            return self.tile_size
        known = self.training_scale
        return max(known.input_size) if known is not None and known.input_size else 0

    def smaller_than_trained(self, height: int, width: int) -> bool:
        """Whether an input of that size (no larger than a tile) is smaller than every
        training input, on its shorter or its longer side: it is then predicted in a canvas
        of the tile's size (``docs/scale.md``). Without a record of the training inputs, or
        with ``tile_size`` set by hand, every input that is not a whole tile is."""
        known = self.training_scale
        if self.tile_size is not None or known is None or not known.input_size:
            tile = self.inference_tile_size
            return (height, width) != (tile, tile)
        short, long = sorted((height, width))
        least_short, least_long = sorted(known.smallest_input)
        return short < least_short or long < least_long

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
            size = f"{scale.input_size[0]}x{scale.input_size[1]}"
            trained = f"inputs up to {size}" if scale.min_input_size else f"{size} inputs"
            logger.warning(
                f"model.tile_size={self.tile_size} but the model was trained on {trained} ({source}); tiles of "
                "the training size keep objects where the model learnt them (unset tile_size to use it)"
            )

    def run_heads(self, batched_inputs, images: ImageList, padding: torch.Tensor, denoising=None):
        """:meth:`forward_heads` on what :meth:`preprocess_image` made of ``batched_inputs``;
        an input too small for the queries is named in the error."""
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
