"""tools/visualize_attention.py in-process: pictures per detection, crops, refusals and errors."""
import os

import numpy as np
import pytest
from conftest import REPO, load_tool, save_random_quickstart_weights
from PIL import Image

tool = load_tool("visualize_attention")

QUICKSTART = os.path.join(REPO, "configs", "quickstart", "soit_nuclei_cpu.py")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("attention_weights") / "random.pth")
    save_random_quickstart_weights(path)
    return path


@pytest.fixture(scope="module")
def image(nuclei, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("attention_image") / "cells.png")
    full = np.asarray(Image.open(os.path.join(nuclei["image_root"], "top_left.png")).convert("RGB"))
    Image.fromarray(full[:256, :256]).save(path)
    return path


def run(weights, image, *args):
    return tool.main(["--config-file", QUICKSTART, "--weights", weights, "--input", image, *args])


def test_one_picture_per_detection_and_no_overwrite(weights, image, tmp_path):
    out = tmp_path / "att"
    assert run(weights, image, "--output", str(out), "--top", "2") == 0
    assert sorted(os.listdir(out)) == ["cells_attention_0.png", "cells_attention_1.png"]
    picture = np.asarray(Image.open(out / "cells_attention_0.png"))
    assert picture.shape == (256, 3 * 256 + 2 * 4, 3)  # three panels of the input, 4-px gaps
    before = (out / "cells_attention_0.png").stat().st_mtime_ns
    with pytest.raises(SystemExit, match="cells_attention_0.png.*already exists.*--overwrite"):
        run(weights, image, "--output", str(out), "--detections", "0")
    assert (out / "cells_attention_0.png").stat().st_mtime_ns == before
    assert run(weights, image, "--output", str(out), "--detections", "0", "--overwrite") == 0


def test_crop_and_chosen_detection(weights, image, tmp_path):
    out = tmp_path / "att"
    assert run(weights, image, "--output", str(out), "--detections", "3", "--crop", "64", "32", "128", "96") == 0
    assert os.listdir(out) == ["cells_attention_3.png"]
    assert np.asarray(Image.open(out / "cells_attention_3.png")).shape == (96, 3 * 128 + 2 * 4, 3)


def test_errors_name_the_input(weights, image, tmp_path):
    out = str(tmp_path / "att")
    with pytest.raises(SystemExit, match="detection index 500 does not exist"):
        run(weights, image, "--output", out, "--detections", "500")
    with pytest.raises(SystemExit, match="--crop 200 0 128 128 reaches outside the 256x256 image"):
        run(weights, image, "--output", out, "--crop", "200", "0", "128", "128")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="cannot read image .*broken.png"):
        run(weights, str(broken), "--output", out)
    with pytest.raises(SystemExit):  # argparse: a missing file is named on stderr
        run(weights, str(tmp_path / "missing.png"), "--output", out)
    assert not os.path.exists(out), "nothing is written when the input is bad"


def test_the_converted_official_fixture(tmp_path):
    """The authors' small variant (R-18, 2+2 layers, 50 queries, 80 classes), converted with
    tools/convert_official.py, drawn for its best detection on one of the fixture's images."""
    import torch
    from conftest import shared_file

    fixture = torch.load(shared_file("fixtures", "official_small.pt"), weights_only=True)
    source, converted = tmp_path / "official.pth", tmp_path / "converted.pth"
    torch.save({"state_dict": fixture["state_dict"]}, source)
    assert load_tool("convert_official").main([str(source), str(converted)]) == 0
    config = tmp_path / "official_small.py"
    config.write_text(
        "from detectron2.config import LazyConfig\n"
        f"_base = LazyConfig.load({os.path.join(REPO, 'configs', 'soit_r50_50ep.py')!r})\n"
        "model, dataloader, train = _base.model, _base.dataloader, _base.train\n"
        "model.backbone.stages.depth = 18\n"
        "model.backbone.stages.pop('stride_in_1x1')\n"
        "model.neck.in_channels = [128, 256, 512]\n"
        "model.transformer.num_encoder_layers = model.transformer.num_decoder_layers = 2\n"
        "model.transformer.num_queries = 50\n"
        "model.mask_encoder.num_layers = 1\n"
        "model.num_classes = 80\n"
        "model.inference_padding = 'official'\n"
        "dataloader.test.mapper.augmentation = []  # the fixture's images at their own size\n"
    )
    image = tmp_path / "fixture0.png"
    Image.fromarray(fixture["inputs"][0].permute(1, 2, 0).numpy()).save(image)  # (224, 288) RGB
    out = tmp_path / "att"
    assert tool.main(["--config-file", str(config), "--weights", str(converted), "--input", str(image),
                      "--output", str(out), "--top", "1"]) == 0  # fmt: skip
    picture = np.asarray(Image.open(out / "fixture0_attention_0.png"))
    assert picture.shape == (224, 3 * 288 + 2 * 4, 3)


def test_quickstart_writes_prediction_truth_and_attention_pictures(nuclei, weights, tmp_path):
    """The quick start's pictures of the held-out tile: predictions, predictions beside the
    ground truth, and the best detection's attention in a window of the training input size."""
    from detectron2.config import instantiate

    from soit.checkpoint.safe_load import SafeCheckpointer
    from soit.config import load_config
    from soit.data.nuclei import register_nuclei

    quickstart = load_tool("quickstart")
    root = os.path.dirname(nuclei["val_json"])
    register_nuclei(root, names=("attention_pictures_train", "attention_pictures_val"))
    overrides = ["model.max_detections=5", "model.auto_scale=False", "dataloader.test.dataset.names=attention_pictures_val"]
    cfg = load_config(QUICKSTART, overrides)
    model = instantiate(cfg.model)
    SafeCheckpointer(model, complete=True).load(weights)
    model.set_training_scale({"object_sizes": [35, 47, 53, 55, 59], "input_size": [256, 256]}, "test")
    paths = quickstart.draw_predictions(cfg, model, str(tmp_path / "vis"), score_threshold=0.0)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["bottom_right_attention.png", "bottom_right_pred.png", "bottom_right_pred_gt.png"]
    shapes = {n: np.asarray(Image.open(tmp_path / "vis" / n)).shape for n in names}
    assert shapes["bottom_right_pred.png"] == (512, 512, 3)
    assert shapes["bottom_right_pred_gt.png"] == (512, 2 * 512 + 8, 3)
    assert shapes["bottom_right_attention.png"] == (256, 3 * 256 + 2 * 4, 3)  # the training window
