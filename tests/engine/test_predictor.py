"""Predictor: weights, original-size outputs, batching, channel order, input checks."""
import logging
import os

import numpy as np
import pytest
import torch
from conftest import REPO, save_random_quickstart_weights
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image

from soit.engine import Predictor
from soit.modeling import test_time

QUICKSTART = os.path.join(REPO, "configs", "quickstart", "soit_nuclei_cpu.py")
# 10 instead of 100 detections: the same code path at a tenth of the mask upsampling
OVERRIDES = ["model.max_detections=10"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("predictor") / "random.pth")
    return path, save_random_quickstart_weights(path)


@pytest.fixture(scope="module")
def predictor(weights):
    return Predictor(QUICKSTART, checkpoint=weights[0], overrides=OVERRIDES)


@pytest.fixture(scope="module")
def image(nuclei):
    """A 300 x 420 BGR crop: not the 512 x 512 of the training tiles, not square."""
    bgr = read_image(os.path.join(nuclei["image_root"], "top_left.png"), format="BGR")
    return np.ascontiguousarray(bgr[100:400, 50:470])


def colour(image):
    """A gray image tinted differently per channel, so that RGB and BGR differ."""
    return (image.astype(np.float32) * np.array([0.4, 0.7, 1.0])).astype(np.uint8)


def assert_same(a, b, atol=0.0):
    assert a.image_size == b.image_size
    assert torch.equal(a.pred_classes, b.pred_classes)
    torch.testing.assert_close(a.scores, b.scores, atol=atol, rtol=0)
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=atol * 1e3, rtol=0)
    assert torch.equal(a.pred_masks, b.pred_masks)


def test_checkpoint_is_loaded(predictor, weights):
    loaded = predictor.model.state_dict()
    assert loaded.keys() == weights[1].keys()
    assert all(torch.equal(loaded[k], v) for k, v in weights[1].items())
    assert not predictor.model.training


def test_outputs_in_original_size(predictor, image):
    out = predictor(image)
    h, w = image.shape[:2]
    assert out.image_size == (h, w) and len(out) == 10
    assert out.pred_masks.dtype == torch.bool and out.pred_masks.shape == (10, h, w)
    assert out.pred_masks.any()
    boxes = out.pred_boxes.tensor
    assert ((boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= w) & (boxes[:, 3] <= h)).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert ((out.scores >= 0) & (out.scores <= 1)).all() and (out.pred_classes == 0).all()
    assert all(t.device.type == "cpu" for t in (boxes, out.scores, out.pred_masks))


def test_batch_equals_single_calls(predictor, image):
    # Same size, different content: no padding, so only the float summation order changes.
    flipped = np.ascontiguousarray(image[::-1, ::-1])
    for single, b in zip((predictor(image), predictor(flipped)), predictor.batch([image, flipped])):
        assert_same(single, b, atol=1e-4)
    assert predictor.batch([]) == []


def test_batch_of_different_sizes(predictor, image):
    small = np.ascontiguousarray(image[40:240, 100:356])  # 200 x 256: padded to 300 x 420 in the batch
    batched = predictor.batch([image, small])
    assert [b.image_size for b in batched] == [(300, 420), (200, 256)]
    assert batched[1].pred_masks.shape == (10, 200, 256)
    assert_same(predictor(image), batched[0], atol=1e-4)  # the largest image is not padded
    # The padded one is not bit-identical to its single call: the backbone's convolutions
    # see the zero padding beside the image border (as in every batched DETR), which moves
    # a random model's near-tied scores by ~3e-3 and can reorder its top-k.
    single = predictor(small)
    torch.testing.assert_close(single.scores.max(), batched[1].scores.max(), atol=1e-2, rtol=0)


def test_rgb_and_bgr_input(predictor, image):
    bgr = colour(image)
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    assert_same(predictor(bgr), predictor(rgb, format="RGB"))
    # the channel order matters for this image, so the test above is not vacuous
    assert not torch.equal(predictor(bgr).scores, predictor(bgr, format="RGB").scores)
    # gray: (H, W) is repeated into 3 channels
    assert_same(predictor(image[:, :, 0]), predictor(image))


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((30, 40, 4), np.uint8), r"image must have shape \(H, W, 3\).*\(30, 40, 4\)"),
        (np.zeros((3, 30, 40), np.uint8), r"image must have shape.*\(3, 30, 40\).*channels first"),
        (np.zeros((30,), np.uint8), r"image must have shape.*\(30,\)"),
        (np.zeros((30, 40, 3), np.float32), r"image must be uint8.*float32"),
    ],
)
def test_bad_image_raises(predictor, bad, match):
    with pytest.raises(ValueError, match=match):
        predictor(bad)


def test_bad_batch_entry_and_format(predictor, image):
    with pytest.raises(ValueError, match=r"images\[1\] must have shape.*\(2, 2, 2\)"):
        predictor.batch([image, np.zeros((2, 2, 2), np.uint8)])
    with pytest.raises(ValueError, match="format must be one of"):
        predictor(image, format="RGBA")


def test_missing_checkpoint(tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        Predictor(QUICKSTART, checkpoint=missing)
    with pytest.raises(FileNotFoundError, match=r"train.init_checkpoint .*nope.pth"):
        Predictor(QUICKSTART, overrides=[f"train.init_checkpoint={missing}"])
    with pytest.raises(FileNotFoundError, match="missing_config.py"):
        Predictor(str(tmp_path / "missing_config.py"))


@pytest.fixture
def log(caplog):
    """caplog on the predictor's logger itself: the demo sets up "soit" without propagation."""
    logger = logging.getLogger("soit.engine.predictor")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_config_object_resize_and_random_weights_warning(image, log):
    cfg = LazyConfig.load(QUICKSTART)
    cfg.dataloader.test.mapper.augmentation = [L(T.ResizeShortestEdge)(short_edge_length=96, max_size=160)]
    predictor = Predictor(cfg, overrides=OVERRIDES)
    assert cfg.model.max_detections == 100, "the caller's config is not changed"
    assert "randomly initialised" in log.text
    assert [type(a) for a in predictor.augmentations.augs] == [T.ResizeShortestEdge]
    assert predictor.metadata.thing_classes == ["nucleus"]

    # the network sees 96 x 134, the detections come back in 300 x 420
    seen = []
    hook = predictor.model.register_forward_pre_hook(lambda m, args: seen.append(args[0][0]["image"].shape))
    out = predictor(image)
    hook.remove()
    assert seen == [(3, 96, 134)]
    assert out.image_size == (300, 420) and out.pred_masks.shape[1:] == (300, 420)
    assert (out.pred_boxes.tensor[:, 2:] <= torch.tensor([420, 300])).all()


def test_tiled_inference_through_an_override(weights, image, monkeypatch):
    # the override makes tiles of 160 with 32 overlap (automatic magnification off: this test
    # is about the tiles at the image's own size)
    overrides = OVERRIDES + ["model.auto_scale=False"]
    tiled = Predictor(QUICKSTART, checkpoint=weights[0], overrides=overrides + ["model.tile_size=160", "model.tile_overlap=32"])
    assert (tiled.model.tile_size, tiled.model.tile_overlap) == (160, 32)
    instances = tiled(image)
    assert instances.image_size == image.shape[:2]
    assert instances.pred_masks.shape[1:] == image.shape[:2] and instances.pred_masks.dtype == torch.bool
    assert 0 < len(instances) <= 10
    # one tile larger than the image: the image is predicted in a tile-sized canvas, and its
    # detections come back inside the image
    large = Predictor(QUICKSTART, checkpoint=weights[0], overrides=overrides + ["model.tile_size=512"])
    canvas = []
    original = test_time.predict_tiles
    monkeypatch.setattr(test_time, "predict_tiles", lambda m, tiles: canvas.append(tuple(tiles.shape[-2:])) or original(m, tiles))
    instances = large(image)
    assert canvas == [(512, 512)]
    assert instances.image_size == image.shape[:2] and instances.pred_masks.shape[1:] == image.shape[:2]
    assert (instances.pred_boxes.tensor[:, 2:] <= torch.tensor(image.shape[1::-1])).all()


def test_scale_search_through_an_override(weights, image):
    # a single factor predicts the image resized by it, and the instances still come back in
    # the image's size; several factors search them
    searched = Predictor(QUICKSTART, checkpoint=weights[0], overrides=OVERRIDES + ["model.test_scales=[0.5,1,2]"])
    assert searched.model.test_scales == (0.5, 1.0, 2.0)
    doubled = Predictor(QUICKSTART, checkpoint=weights[0], overrides=OVERRIDES + ["model.test_scales=[2]"])
    instances = doubled(image)
    assert instances.image_size == image.shape[:2] and instances.pred_masks.shape[1:] == image.shape[:2]
    # the search returns one of its factors' results
    singles = [Predictor(QUICKSTART, checkpoint=weights[0], overrides=OVERRIDES + [f"model.test_scales=[{f}]"])(image)
               for f in (0.5, 1.0, 2.0)]  # fmt: skip
    found = searched(image)
    assert any(torch.equal(found.scores, s.scores) and torch.equal(found.pred_masks, s.pred_masks) for s in singles)
