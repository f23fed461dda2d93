"""tools/check_dataset.py on the image files: EXIF orientation, truncated files, --fast."""
import json
import os

import numpy as np
import pytest
from conftest import load_tool
from detectron2.data.detection_utils import SizeMismatchError, check_image_size, read_image
from PIL import Image, ImageFile

from soit.data.dataset_mapper import read_image_8bit

check_dataset = load_tool("check_dataset")

STORED_W, STORED_H = 40, 24


def write_image(path, orientation=None):
    """A STORED_W x STORED_H noise image (noise: a truncated file loses pixel data, not padding)."""
    pixels = np.random.default_rng(0).integers(0, 256, (STORED_H, STORED_W, 3), dtype=np.uint8)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif)
    return path


def write_json(root, file_name, width, height):
    path = os.path.join(root, "set.json")
    with open(path, "w") as f:
        image = {"id": 1, "file_name": file_name, "height": height, "width": width}
        json.dump({"images": [image], "annotations": [], "categories": [{"id": 1, "name": "blob"}]}, f)
    return path


def check(root, json_file, *extra):
    return check_dataset.main([json_file, "--image-root", str(root), "--num-queries", "0", *extra])


def trains(path, width, height):
    """Whether the training mapper's size check accepts ``path`` as ``width`` x ``height``."""
    try:
        check_image_size({"file_name": path, "width": width, "height": height}, read_image_8bit(path))
    except SizeMismatchError:
        return False
    return True


@pytest.mark.parametrize("fast", [False, True], ids=["decoded", "fast"])
@pytest.mark.parametrize("ext", ["jpg", "png"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_size_is_checked_after_exif_orientation_as_training_reads_it(tmp_path, capsys, orientation, ext, fast):
    path = write_image(str(tmp_path / f"img.{ext}"), orientation)
    height, width = read_image_8bit(path).shape[:2]
    assert read_image(path).shape[:2] == (height, width)  # detectron2's reader agrees
    assert (width, height) == ((STORED_H, STORED_W) if orientation >= 5 else (STORED_W, STORED_H))
    extra = ["--fast"] if fast else []

    # the size training reads: accepted by training and by the check
    assert trains(path, width, height)
    assert check(tmp_path, write_json(tmp_path, f"img.{ext}", width, height), *extra) == 0, capsys.readouterr().out
    capsys.readouterr()

    # the stored size: training fails on it for orientations 5-8, and so does the check
    json_file = write_json(tmp_path, f"img.{ext}", STORED_W, STORED_H)
    assert check(tmp_path, json_file, *extra) == (0 if trains(path, STORED_W, STORED_H) else 1)
    if orientation >= 5:
        assert (
            f"{json_file}: image img.{ext}: the file is 24x40 once its EXIF orientation {orientation} is applied "
            "(stored 40x24), but the JSON says 40x24: images are read with their EXIF orientation applied, so the "
            "JSON should say 24x40"
        ) in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_truncated_image_is_reported_unless_fast(tmp_path, capsys, monkeypatch, ext):
    path = write_image(str(tmp_path / f"img.{ext}"))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) * 2 // 3])
    with pytest.raises(OSError, match="truncated"):
        read_image_8bit(path)  # what training would meet
    json_file = write_json(tmp_path, f"img.{ext}", STORED_W, STORED_H)

    # reported even where PIL was told to fill truncated files in, and that setting is kept
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert check(tmp_path, json_file) == 1
    out = capsys.readouterr().out
    assert f"{json_file}: image img.{ext}: the file {path} is not a readable image (OSError: " in out
    assert "truncated" in out and ImageFile.LOAD_TRUNCATED_IMAGES is True

    # --fast reads the header only: the size is right, the damage is not seen
    assert check(tmp_path, json_file, "--fast") == 0
    assert "1 images, 0 annotations, 1 categories; image headers only (--fast), no problems" in capsys.readouterr().out


def test_help_says_why_images_are_decoded_and_what_fast_skips(capsys):
    with pytest.raises(SystemExit) as exit:
        check_dataset.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit.value.code == 0
    assert "Every image is decoded in full by default: a truncated file has an intact header" in out
    assert "--fast read only the image headers (size, EXIF orientation), not the pixels" in out
    assert "a truncated or corrupt file passes" in out
