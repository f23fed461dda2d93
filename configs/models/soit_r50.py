"""SOIT with a ResNet-50 backbone: the official R-50 setting (docs/model.md, sections 1-7).

Every ablation knob of the paper (Tables 2-5) is a value here; experiments override them.
"""
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet

from soit.modeling import (
    SOIT,
    ChannelMapper,
    DeformableTransformer,
    HungarianMatcher,
    InstanceAwareMaskHead,
    MaskEncoder,
    SetCriterion,
)

model = L(SOIT)(
    # torchvision-style ResNet (stride in the 3x3 conv), stem and res2 frozen, FrozenBN
    backbone=L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=False, norm="FrozenBN"),
        out_features=["res3", "res4", "res5"],
        freeze_at=2,
    ),
    in_features=["res3", "res4", "res5"],
    neck=L(ChannelMapper)(in_channels=[512, 1024, 2048], out_channels="${..embed_dim}", num_extra_levels=1),
    transformer=L(DeformableTransformer)(
        embed_dim="${..embed_dim}",
        num_heads=8,
        num_levels=4,
        num_points=4,
        num_encoder_layers=6,
        num_decoder_layers=6,
        ffn_dim=1024,
        dropout=0.1,
        num_queries=300,
        two_stage="${..two_stage}",
        box_refine="${..with_box_refine}",
        # training options beyond the paper (projects/SOIT/README.md), off = the paper
        mixed_query_selection=False,  # DINO: learned content queries, positional from proposals
        look_forward_twice=False,  # DINO: a layer's box loss also refines the previous layer's box
        num_queries_one2many=0,  # H-DETR: training-only queries matched one-to-many (e.g. 1500)
    ),
    # paper Table 4: mask-encoder layers (0 = Linear + LayerNorm on P3 only)
    mask_encoder=L(MaskEncoder)(
        embed_dim="${..embed_dim}",
        mask_channels="${..mask_head.mask_channels}",
        num_layers=1,
        ffn_dim="${..transformer.ffn_dim}",
        dropout="${..transformer.dropout}",
    ),
    # paper Tables 2-3 and 5: heads M, mask channels C_mask, position encoding
    mask_head=L(InstanceAwareMaskHead)(mask_channels=8, num_heads=4, num_points=4, pos_encoding="relative"),
    criterion=L(SetCriterion)(
        num_classes="${..num_classes}",
        matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0),
        cls_weight=2.0,
        bbox_weight=5.0,
        giou_weight=2.0,
        dice_weight=8.0,
        bce_weight=2.0,
        # paper Table 5: number of (last) decoder layers with mask loss; None = all
        mask_loss_layers=None,
        # "official" keeps the release's padding quirk; "exclude" drops padded pixels
        mask_loss_padding="exclude",
        # "focal" (paper) or IoU-aware classification: "varifocal", "ia_bce" (model card)
        cls_loss="focal",
        mask_loss_points=0,  # 0: dense Dice + BCE (paper); P: at P sampled points per mask
        one2many_repeats=6,  # H-DETR, with transformer.num_queries_one2many > 0
        one2many_weight=1.0,
        # masks of the training-only groups (one-to-many, denoising): on their last N decoder
        # layers (None: as mask_loss_layers), and at P points per mask only (0: as the rest)
        extra_mask_loss_layers=None,
        extra_mask_loss_points=0,
    ),
    # denoising queries with masks (DN-DETR / DINO / Mask DINO): None = off (the paper), or
    # L(DenoisingQueries)(num_classes="${..num_classes}", embed_dim="${..embed_dim}", groups=5)
    denoising=None,
    # training memory (projects/SOIT/README.md): parts recomputed in the backward pass instead
    # of keeping their activations, any of "backbone", "encoder", "mask_encoder", "decoder",
    # "mask_head"; and the deformable attention's sampling in float32 under autocast
    activation_checkpointing=[],
    attention_fp32=False,
    num_classes=80,
    # the official model takes RGB with torchvision's ImageNet statistics
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
    embed_dim=256,
    with_box_refine=True,
    two_stage=True,
    max_detections=100,
    mask_threshold=0.5,
    inference_padding="crop",
)
