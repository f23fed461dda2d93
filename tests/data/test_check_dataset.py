"""tools/check_dataset.py and the dataset check of train_net.py."""
import copy
import json
import os
import re

import numpy as np
import pycocotools.mask as mask_util
import pytest
from conftest import REPO, dataset_overrides, load_tool, register_coco_replacing, write_synthetic_coco

from soit.engine import training as train_net
from soit.data.check import check_coco_json, check_registered_dataset, encoder_tokens, min_image_side

check_dataset = load_tool("check_dataset")

QUICKSTART = os.path.join(REPO, "configs", "quickstart", "soit_nuclei_cpu.py")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("check"))
    write_synthetic_coco(root, num_images=3)
    with open(os.path.join(root, "train.json")) as f:
        return root, json.load(f)


def variant(root, data, name, change):
    data = copy.deepcopy(data)
    change(data)
    path = os.path.join(root, f"{name}.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def set_ann(key, value, index=1):
    def change(data):
        data["annotations"][index][key] = value

    return change


CASES = {
    # name: (change, expected text, annotation id named or None)
    "nan_box": (set_ann("bbox", [1.0, 2.0, float("nan"), 5.0]), "is not 4 finite numbers", 2),
    "negative_box": (set_ann("bbox", [1.0, 2.0, -3.0, 5.0]), "negative width or height", 2),
    "empty_polygons": (set_ann("segmentation", []), "empty polygon list", 2),
    "short_polygon": (set_ann("segmentation", [[1, 1, 5, 1]]), "has 2 points (at least 3 needed)", 2),
    "unknown_category": (set_ann("category_id", 9), "category_id 9 is not in 'categories'", 2),
    "duplicate_annotation_id": (set_ann("id", 1), "annotation id 1 is used by 2 annotations", 1),
    "unknown_image": (set_ann("image_id", 42), "image_id 42 is not in 'images'", 2),
    "duplicate_image_id": (lambda d: d["images"][1].update(id=1), "image id 1 is used by 2 images", None),
    "size_mismatch": (lambda d: d["images"][0].update(height=100), "the file is 88x72 but the JSON says 88x100", None),
    "missing_file": (lambda d: d["images"][2].update(file_name="gone.png"), "gone.png does not exist", None),
    "too_small": (lambda d: d["images"][0].update(height=40, width=40), "fewer than the model's 100 queries", None),
    # the synthetic images are 72x88 = 6336 pixels
    "rle_runs_short": (
        set_ann("segmentation", {"counts": [100, 20, 100], "size": [72, 88]}),
        "uncompressed RLE counts sum to 220, but its size 72x88 needs h*w = 6336", 2,
    ),
    "rle_runs_negative": (
        set_ann("segmentation", {"counts": [6000, -4, 340], "size": [72, 88]}),
        "uncompressed RLE counts are not all non-negative integers", 2,
    ),
    "rle_string_short": (  # "345": the runs 3, 4, 5
        set_ann("segmentation", {"counts": "345", "size": [72, 88]}),
        "compressed RLE counts sum to 12, but its size 72x88 needs h*w = 6336", 2,
    ),
    "rle_string_negative": (  # "K" = -5: the fourth run is the second one (4) minus 5
        set_ann("segmentation", {"counts": "345K", "size": [72, 88]}),
        "compressed RLE counts decode to a negative run length (-1)", 2,
    ),
    "rle_string_undecodable": (
        set_ann("segmentation", {"counts": "34!5", "size": [72, 88]}),
        "compressed RLE counts cannot be decoded: character '!' at 2 is not one of '0'..'o'", 2,
    ),
    "rle_string_unfinished": (  # "P" = 0x20 + 0: a run length continued by nothing
        set_ann("segmentation", {"counts": "34P", "size": [72, 88]}),
        "compressed RLE counts cannot be decoded: the string ends inside a run length", 2,
    ),
}  # fmt: skip


def test_clean_dataset_one_line_and_exit_0(clean, capsys):
    root, _ = clean
    assert check_dataset.main([os.path.join(root, "train.json"), "--image-root", os.path.join(root, "images")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("OK ") and "3 images, 6 annotations, 1 categories, no problems" in out[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_bad_dataset_is_listed_with_file_and_annotation(clean, case, capsys):
    root, data = clean
    change, text, ann_id = CASES[case]
    path = variant(root, data, case, change)
    assert check_dataset.main([path, "--image-root", os.path.join(root, "images")]) == 1
    out = capsys.readouterr().out
    line = next((ln for ln in out.splitlines() if text in ln), None)
    assert line is not None, out
    assert line.startswith(path) and (f"annotation {ann_id}:" in line if ann_id else True)
    assert out.strip().splitlines()[-1].startswith("FAILED ")


def test_invalid_json_is_named(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    assert check_dataset.main([str(path)]) == 1
    assert f"{path} is not valid JSON" in capsys.readouterr().out


def test_encoder_tokens_bound():
    assert encoder_tokens(72, 72) == 81 + 25 + 9 + 4
    side = min_image_side(100)
    assert encoder_tokens(side, side) >= 100 > encoder_tokens(side - 1, side - 1)


def test_train_net_refuses_an_evaluation_set_that_would_crash_coco_eval(clean, synthetic_dataset, tmp_path):
    root, data = clean
    path = variant(root, data, "eval_empty_polygon", CASES["empty_polygons"][0])
    name = "test_check_eval_empty_polygon"
    register_coco_replacing(name, path, os.path.join(root, "images"))
    out = tmp_path / "run"
    args = train_net.argument_parser().parse_args(
        ["--config-file", QUICKSTART, f"train.output_dir={out}", "train.max_iter=1",
         *dataset_overrides(synthetic_dataset, name)]
    )  # fmt: skip
    with pytest.raises(ValueError, match=rf"(?s){name}.*annotation 2: empty polygon list.*check_dataset.py"):
        train_net.main(args)
    assert not (out / "model_final.pth").exists() and not (out / "last_checkpoint").exists()
    assert check_coco_json(path) and not check_coco_json(os.path.join(root, "train.json"))


def _runs(seed):
    """Run lengths of a 72x88 mask: many short and long runs (the compressed string stores
    most of them as differences, positive and negative, of one to three characters)."""
    rng = np.random.default_rng(seed)
    runs = rng.integers(0, 400, 30) * rng.integers(0, 2, 30) + rng.integers(1, 20, 30)
    return [*runs.tolist(), 72 * 88 - int(runs.sum())]


@pytest.mark.parametrize("runs", [[6336], [0, 6336], [6335, 1], _runs(0), _runs(1)])
@pytest.mark.parametrize("missing", [0, 1, -1])
def test_rle_runs_must_sum_to_the_mask_size(clean, runs, missing):
    # COCO segm evaluation never ends on an RLE whose runs do not cover h*w
    root, data = clean
    runs = [*runs[:-1], runs[-1] - missing]
    uncompressed = {"counts": runs, "size": [72, 88]}
    compressed = mask_util.frPyObjects(uncompressed, 72, 88)
    compressed["counts"] = compressed["counts"].decode()

    def change(d):
        d["annotations"][0]["segmentation"] = uncompressed
        d["annotations"][1]["segmentation"] = compressed

    problems = check_coco_json(variant(root, data, f"rle_{len(runs)}_{missing}", change))
    sums = f"counts sum to {6336 - missing}, but its size 72x88 needs h*w = 6336"
    expected = [] if not missing else [(1, f"uncompressed RLE {sums}"), (2, f"compressed RLE {sums}")]
    assert [(p.annotation, p.what) for p in problems] == expected
    assert all(p.breaks_evaluation for p in problems)


def test_train_net_refuses_an_evaluation_set_with_a_bad_rle_without_reading_images(clean):
    root, data = clean

    def change(d):
        CASES["rle_runs_short"][0](d)
        d["images"][2]["file_name"] = "gone.png"  # not looked at when training starts

    name = register_coco_replacing(
        "test_check_eval_bad_rle", variant(root, data, "eval_bad_rle", change), os.path.join(root, "images")
    )
    what = CASES["rle_runs_short"][1]
    with pytest.raises(ValueError, match=rf"(?s){name}.*annotation 2: {re.escape(what)}.*check_dataset.py"):
        check_registered_dataset(name, evaluation=True)
    assert [str(p) for p in check_registered_dataset(name)] == [f"image img0.png, annotation 2: {what}"]
