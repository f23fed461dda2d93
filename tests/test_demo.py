"""tools/demo.py in-process: images, folders, video, output safety and error messages."""
import os

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO, load_tool, save_random_quickstart_weights
from detectron2.structures import Instances
from PIL import Image

from soit.data.dataset_mapper import read_image_8bit


demo = load_tool("demo")

QUICKSTART = os.path.join(REPO, "configs", "quickstart", "soit_nuclei_cpu.py")
# A random model's 100 detections all pass threshold 0; 5 are enough to see drawing, and
# drawing 100 masks would take seconds per image.
FAST = ["--confidence-threshold", "0", "model.max_detections=5"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("demo_weights") / "random.pth")
    save_random_quickstart_weights(path)
    return path


def run(weights, *args):
    return demo.main(["--config-file", QUICKSTART, "--weights", weights, *args])


def tile(nuclei, name):
    return os.path.join(nuclei["image_root"], f"{name}.png")


def test_two_images_are_drawn(nuclei, weights, tmp_path):
    inputs = [tile(nuclei, "top_left"), tile(nuclei, "bottom_right")]
    out = tmp_path / "drawn"
    # overrides straight after --input: they are not taken for images
    assert run(weights, "--output", str(out), "--input", *inputs, *FAST) == 0
    assert sorted(os.listdir(out)) == ["bottom_right.png", "top_left.png"]
    for path in inputs:
        original, drawn = cv2.imread(path), cv2.imread(str(out / os.path.basename(path)))
        assert drawn.shape == original.shape == (512, 512, 3)
        assert (drawn != original).any(axis=2).mean() > 0.001, "detections are drawn"


def test_folder_with_repeated_name_and_unreadable_file(nuclei, weights, tmp_path):
    folder, other = tmp_path / "in", tmp_path / "other"
    folder.mkdir()
    other.mkdir()
    image = cv2.imread(tile(nuclei, "top_left"))
    cv2.imwrite(str(folder / "b.png"), image[:160, :200])
    cv2.imwrite(str(folder / "a.jpg"), image[200:360, 100:228])
    (folder / "broken.png").write_bytes(b"not a png")  # skipped with a warning
    (folder / "notes.txt").write_text("not an image")  # not listed
    cv2.imwrite(str(other / "b.png"), image[300:400, 300:400])
    out = tmp_path / "drawn"
    assert run(weights, "--input", str(folder), str(other / "b.png"), "--output", str(out), *FAST) == 0
    # sorted folder first, then the explicit file, whose name is taken already
    assert sorted(os.listdir(out)) == ["a.jpg", "b.png", "b_1.png"]
    assert cv2.imread(str(out / "b.png")).shape == (160, 200, 3)
    assert cv2.imread(str(out / "a.jpg")).shape == (160, 128, 3)
    assert cv2.imread(str(out / "b_1.png")).shape == (100, 100, 3)


def test_video(nuclei, weights, tmp_path):
    image = cv2.imread(tile(nuclei, "top_left"))
    video = str(tmp_path / "cells.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5, (128, 128))
    for i in range(4):
        writer.write(np.ascontiguousarray(image[40 * i : 40 * i + 128, 100:228]))
    writer.release()
    out = str(tmp_path / "drawn.mp4")
    assert run(weights, "--video-input", video, "--output", out, *FAST) == 0
    capture = cv2.VideoCapture(out)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    assert capture.get(cv2.CAP_PROP_FPS) == 5
    capture.release()
    assert len(frames) == 4 and all(f.shape == (128, 128, 3) for f in frames)


def test_refuses_to_overwrite(nuclei, weights, tmp_path, capsys):
    out = tmp_path / "drawn.png"
    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit):
        run(weights, "--input", tile(nuclei, "top_left"), "--output", str(out), *FAST)
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    # one image and a file name: --output is that file
    assert run(weights, "--input", tile(nuclei, "top_left"), "--output", str(out), "--overwrite", *FAST) == 0
    assert cv2.imread(str(out)).shape == (512, 512, 3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "{tmp}/nothing/*.png"], "--input '{tmp}/nothing/*.png' matches no file"),
        (["--input", "{tmp}"], "folder '{tmp}' holds no image"),
        (["--video-input", "{tmp}/missing.mp4"], "--video-input '{tmp}/missing.mp4' does not exist"),
        (["--webcam"], "--webcam needs --output"),
    ],
)
def test_argument_errors(weights, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        run(weights, *[a.format(tmp=tmp_path) for a in args])
    assert exit.value.code == 2 and message.format(tmp=tmp_path) in capsys.readouterr().err


def test_missing_config_and_unreadable_files(weights, tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--config-file", str(tmp_path / "nope.py"), "--input", "x.png"])
    assert f"--config-file '{tmp_path / 'nope.py'}' does not exist" in capsys.readouterr().err

    video = tmp_path / "broken.mp4"
    video.write_bytes(b"not a video")
    with pytest.raises(SystemExit):
        run(weights, "--video-input", str(video))
    assert f"cannot open '{video}'" in capsys.readouterr().err

    # named explicitly: an error, not a warning
    image = tmp_path / "broken.png"
    image.write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=f"cannot read image '{image}'"):
        run(weights, "--input", str(image))


def test_overrides_after_input_are_split_off():
    parser = demo.get_parser()
    args = demo.parse_args(parser, ["--config-file", "c.py", "--input", "a.png", "model.max_detections=5", "x=1"])
    assert args.input == ["a.png"] and args.opts == ["model.max_detections=5", "x=1"]


class RecordingPredictor:
    """Stands in for ``soit.engine.Predictor``: keeps each image and format it is given, detects nothing."""

    def __init__(self):
        self.calls = []

    def __call__(self, image, format="BGR"):
        self.calls.append((image, format))
        return Instances(image.shape[:2], scores=torch.zeros(0))


def _rgb(h=24, w=40):
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _16bit(path):  # values spread over the whole 16-bit range
    cv2.imwrite(path, np.linspace(0, 65535, 24 * 40).reshape(24, 40).astype(np.uint16))


def _palette(path):
    Image.fromarray(_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path)


def _cmyk(path):
    Image.fromarray(_rgb()).convert("CMYK").save(path)


def _exif_rotated(path):
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees: 24 wide, 40 high
    Image.fromarray(_rgb()).save(path, exif=exif)


@pytest.mark.parametrize(
    "name, write", [("16bit.png", _16bit), ("palette.png", _palette), ("cmyk.jpg", _cmyk), ("exif6.jpg", _exif_rotated)]
)
def test_images_reach_the_model_as_the_training_mapper_reads_them(tmp_path, name, write):
    path = str(tmp_path / name)
    write(path)
    predictor = RecordingPredictor()
    assert demo.run_images(predictor, [(path, True)], [None], 0.5) == 1
    [(image, fmt)] = predictor.calls
    assert fmt == "BGR" and image.dtype == np.uint8
    np.testing.assert_array_equal(image, read_image_8bit(path, format="BGR"))
    if name == "16bit.png":  # the full range scaled to 8 bits, not clipped to white
        assert image.min() == 0 and image.max() == 255 and len(np.unique(image)) > 200
    if name == "exif6.jpg":
        assert image.shape == (40, 24, 3)
