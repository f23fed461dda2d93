"""Backbone variants: each config's neck reads the channels its backbone gives."""
import os

import torch
from detectron2.config import LazyConfig, instantiate

from conftest import REPO
from soit.modeling.backbone import TimmBackbone


def test_timm_swin_backbone_gives_nchw_maps_at_strides_8_16_32():
    backbone = TimmBackbone("swin_tiny_patch4_window7_224", (1, 2, 3), strict_img_size=False).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 100, 136))
    shapes = backbone.output_shape()
    assert list(feats) == ["stage2", "stage3", "stage4"]
    for name, f in feats.items():
        stride = shapes[name].stride
        assert f.shape == (1, shapes[name].channels, -(-100 // stride), -(-136 // stride))
    assert [s.stride for s in shapes.values()] == [8, 16, 32]


def test_model_configs_wire_backbone_channels_to_the_neck():
    for name in ("soit_r50", "soit_r101", "soit_swin_l"):
        cfg = LazyConfig.load(os.path.join(REPO, "configs", "models", f"{name}.py"))
        backbone = instantiate(cfg.model.backbone)
        shapes = backbone.output_shape()
        assert [shapes[f].channels for f in cfg.model.in_features] == list(cfg.model.neck.in_channels), name
        assert [shapes[f].stride for f in cfg.model.in_features] == [8, 16, 32], name
