"""What inference needs to know about training is recorded by training and saved with the weights."""
import logging
import os

import pytest
import torch
from conftest import QUICKSTART, register_coco_replacing, run, write_synthetic_coco
from detectron2.config import LazyConfig

from soit.engine import Predictor
from soit.modeling import test_time


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("scale_blobs"))
    write_synthetic_coco(root)  # 88 x 72 images, ellipses of 16-32 px
    register_coco_replacing("test_scale_blobs", os.path.join(root, "train.json"), os.path.join(root, "images"))
    return root


def train_tiny(output_dir, augmentation, extra=()):
    overrides = [
        f"train.output_dir={output_dir}", "train.max_iter=1", "train.checkpointer.period=100",
        "dataloader.train.dataset.names=test_scale_blobs", "dataloader.train.total_batch_size=2",
        "model.transformer.num_queries=10", "model.transformer.num_decoder_layers=1",
        "model.transformer.ffn_dim=64", "model.mask_encoder.ffn_dim=64", "train.scale_samples=40", *extra,
    ]  # fmt: skip
    cfg = LazyConfig.apply_overrides(LazyConfig.load(QUICKSTART), overrides)
    cfg.dataloader.train.mapper.augmentation = augmentation
    del cfg.dataloader["evaluator"]
    run(cfg)
    path = os.path.join(output_dir, "model_final.pth")
    config = os.path.join(output_dir, "config.yaml")
    return path, config


def _predictor(weights, config, *overrides):
    return Predictor(config, weights, overrides=["model.transformer.num_queries=10", *overrides])


def test_a_model_trained_on_crops_tiles_at_its_crop_size(blobs, tmp_path, monkeypatch):
    from detectron2.data import transforms as T

    crop = {"_target_": T.RandomCrop, "crop_type": "absolute", "crop_size": [48, 48]}
    weights, config = train_tiny(tmp_path / "crops", [crop])
    saved = torch.load(weights, map_location="cpu", weights_only=True)["training_scale"]
    assert saved["input_size"] == [48, 48] and saved["num_objects"] > 0
    assert 8 < saved["object_sizes"][2] < 40  # the ellipses' box sizes, in pixels of the 48 x 48 inputs
    predictor = _predictor(weights, config)
    assert predictor.model.training_scale.input_size == (48, 48)
    assert predictor.model.inference_tile_size == 48  # nothing set by the user
    tiled = []
    original = test_time.predict_tiled
    monkeypatch.setattr(test_time, "predict_tiled", lambda m, x: tiled.append(x["image"].shape) or original(m, x))
    predictor(torch.randint(0, 255, (72, 88, 3), dtype=torch.uint8).numpy())
    assert tiled  # the 88 x 72 image was predicted in 48 x 48 tiles
    assert _predictor(weights, config, "model.tile_size=0").model.inference_tile_size == 0  # the user's word wins


def test_a_model_trained_on_whole_images_of_varying_size_tiles_only_larger_images(blobs, tmp_path, caplog, monkeypatch):
    from detectron2.data import transforms as T

    resize = {"_target_": T.ResizeShortestEdge, "short_edge_length": [56, 64, 72], "max_size": 200, "sample_style": "choice"}
    weights, config = train_tiny(tmp_path / "whole", [resize])  # 88 x 72 images: inputs from 68 x 56 to 88 x 72
    predictor = _predictor(weights, config, "model.auto_scale=False")
    scale = predictor.model.training_scale
    assert scale.input_size == (72, 88) and scale.smallest_input == (56, 68)  # shorter side first
    assert predictor.model.inference_tile_size == 88
    calls = []
    for name in ("predict_untiled", "predict_in_canvas", "tiled_predict"):
        original = getattr(test_time, name)
        monkeypatch.setattr(test_time, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))

    def seen_as(h, w):
        calls.clear()
        predictor(torch.randint(0, 255, (h, w, 3), dtype=torch.uint8).numpy())
        return calls[0]

    # the sizes it was trained on, turned or not: one pass, as the whole images it knows
    assert seen_as(72, 88) == seen_as(88, 72) == seen_as(60, 80) == "predict_untiled"
    assert seen_as(100, 150) == "tiled_predict"  # larger than every training input: tiles of the largest
    assert seen_as(40, 60) == "predict_in_canvas"  # smaller than every one: in a canvas of that size
    with caplog.at_level(logging.WARNING):
        tiled = _predictor(weights, config, "model.tile_size=32", "model.tile_overlap=8")
    assert tiled.model.inference_tile_size == 32  # an override wins, and the difference is logged
    assert "model.tile_size=32 but the model was trained on inputs up to 72x88" in caplog.text


def test_the_config_takes_precedence_over_the_checkpoint_and_the_difference_is_logged(blobs, tmp_path, caplog):
    from detectron2.data import transforms as T

    crop = {"_target_": T.RandomCrop, "crop_type": "absolute", "crop_size": [48, 48]}
    weights, config = train_tiny(tmp_path / "crops2", [crop])
    mine = "model.training_scale={object_sizes: [10, 12, 14, 16, 18], input_size: [64, 64]}"
    with caplog.at_level(logging.WARNING):
        predictor = _predictor(weights, config, mine)
    assert predictor.model.training_scale.input_size == (64, 64)
    assert predictor.model.inference_tile_size == 64
    assert "model.training_scale from the config" in caplog.text and "48x48" in caplog.text
    with caplog.at_level(logging.WARNING):
        _predictor(weights, config, "model.tile_size=40", "model.tile_overlap=8")
    assert "model.tile_size=40 but the model was trained on 48x48 inputs" in caplog.text
