"""The nuclei quick-start dataset: download, checksums, split, COCO files, registration."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from conftest import check_label_image_entry, check_registration

from soit.data.nuclei import NUCLEI_SHA256, QUADRANTS, VAL_QUADRANT, prepare_nuclei, register_nuclei

# Nuclei touching each 256 x 256 quadrant of mask2d.tif (soit/data/nuclei.py).
QUADRANT_COUNTS = {"top_left": 35, "top_right": 33, "bottom_left": 40, "bottom_right": 29}


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_split_counts_and_coco_files(nuclei):
    train, val = _load(nuclei["train_json"]), _load(nuclei["val_json"])
    assert [img["file_name"] for img in val["images"]] == [f"{VAL_QUADRANT}.png"]
    assert sorted(img["file_name"] for img in train["images"]) == sorted(
        f"{q}.png" for q in QUADRANTS if q != VAL_QUADRANT
    )
    assert nuclei["num_instances"] == {"train": 108, "val": 29}
    assert len(train["annotations"]) == 108 and len(val["annotations"]) == 29
    for split in (train, val):
        assert split["categories"] == [{"id": 1, "name": "nucleus", "supercategory": "nucleus"}]
        assert len({a["id"] for a in split["annotations"]}) == len(split["annotations"])
        for img in split["images"]:
            anns = [a for a in split["annotations"] if a["image_id"] == img["id"]]
            assert len(anns) == QUADRANT_COUNTS[img["file_name"][:-4]]
            assert (img["height"], img["width"]) == (512, 512)
            pixels = np.asarray(Image.open(os.path.join(nuclei["image_root"], img["file_name"])))
            assert pixels.shape[:2] == (512, 512)
            check_label_image_entry(pixels, anns)


def test_idempotent_and_leaves_other_files(nuclei, nuclei_wheel_cache, tmp_path):
    again = prepare_nuclei(os.path.dirname(nuclei["train_json"]), cache_dir=nuclei_wheel_cache)
    assert again["skipped"] and again["num_instances"] == nuclei["num_instances"]

    root = tmp_path / "nuclei_x1"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    first = prepare_nuclei(str(root), scale=1, cache_dir=nuclei_wheel_cache)
    assert not first["skipped"]
    assert Image.open(root / "images" / "top_left.png").size == (256, 256)
    mtime = os.path.getmtime(first["train_json"])
    second = prepare_nuclei(str(root), scale=1, cache_dir=nuclei_wheel_cache)
    assert second["skipped"] and os.path.getmtime(first["train_json"]) == mtime
    assert (root / "notes.txt").read_text() == "mine"
    # A changed setting invalidates the manifest and rebuilds.
    third = prepare_nuclei(str(root), scale=3, cache_dir=nuclei_wheel_cache)
    assert not third["skipped"] and Image.open(root / "images" / "top_left.png").size == (768, 768)
    assert third["num_instances"] == {"train": 108, "val": 29}


def test_checksum_mismatch_is_a_clear_error(nuclei, nuclei_wheel_cache, tmp_path):
    wrong = dict(NUCLEI_SHA256)
    member = "stardist/data/images/img2d.tif"
    wrong[member] = "0" * 64
    with pytest.raises(RuntimeError, match="SHA-256 mismatch for stardist/data/images/img2d.tif") as info:
        prepare_nuclei(str(tmp_path / "bad"), cache_dir=nuclei_wheel_cache, expected_sha256=wrong)
    assert NUCLEI_SHA256[member] in str(info.value) and "0" * 64 in str(info.value)
    assert not (tmp_path / "bad" / "train.json").exists()


def test_scale_must_be_a_positive_integer(tmp_path):
    with pytest.raises(ValueError, match="positive integer"):
        prepare_nuclei(str(tmp_path), scale=1.5)


def test_register_nuclei(nuclei, tmp_path):
    root = os.path.dirname(nuclei["train_json"])
    names = ("test_nuclei_reg_train", "test_nuclei_reg_val")
    check_registration(register_nuclei, root, names, (3, 1), (108, 29), str(tmp_path / "elsewhere"))
