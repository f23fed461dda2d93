"""dev/benchmark_scale.py: the drawn test cases, and one tiny run end to end on the nuclei split."""
import argparse
import json
import os
import subprocess
import sys

import pytest
from conftest import QUICKSTART, REPO, load_tool, register_coco_replacing

TOOL = os.path.join(REPO, "dev", "benchmark_scale.py")


def test_drawn_factors_are_reproducible_log_uniform_and_sorted():
    tool = load_tool("benchmark_scale", "dev")
    factors = tool.draw_factors(8, seed=0)
    assert factors == tool.draw_factors(8, seed=0) == sorted(factors)
    assert factors != tool.draw_factors(8, seed=1)
    assert all(0.5 <= f <= 2 for f in factors) and len(set(factors)) == 8
    assert set(tool.draw_factors(2, seed=0)) <= set(factors)  # a shorter run's cases are among a longer one's
    many = tool.draw_factors(2000, seed=0)
    assert 0.45 < sum(f < 1 for f in many) / len(many) < 0.55  # log-uniform: half below 1x


def test_crop_size_is_the_training_crop_unless_given():
    tool = load_tool("benchmark_scale", "dev")
    cfg = tool.bsd.load_soit_config({"config": QUICKSTART, "overrides": []})
    assert tool.crop_size_of(cfg, argparse.Namespace(crop_size=0)) == 256  # its RandomCrop
    assert tool.crop_size_of(cfg, argparse.Namespace(crop_size=300)) == 300


def test_crops_cover_the_held_out_tile_with_their_ground_truth(nuclei, tmp_path):
    import numpy as np
    from PIL import Image

    tool = load_tool("benchmark_scale", "dev")
    name = register_coco_replacing("benchmark_scale_test_val", nuclei["val_json"], nuclei["image_root"])
    whole = np.asarray(Image.open(os.path.join(nuclei["image_root"], "bottom_right.png")))
    assert whole.shape[:2] == (512, 512)
    for size, count in ((256, 4), (128, 16)):
        path, root, n = tool.write_crops(name, size, str(tmp_path / str(size)))
        coco = json.loads(open(path).read())
        assert n == len(coco["images"]) == count
        first = next(i for i in coco["images"] if i["file_name"] == "bottom_right_y0_x0.png")
        assert (np.asarray(Image.open(os.path.join(root, first["file_name"]))) == whole[:size, :size]).all()
        # every instance touches its crop, and every nucleus of the tile is in some crop
        assert all(a["area"] > 0 for a in coco["annotations"])
        assert len(coco["annotations"]) >= nuclei["num_instances"]["val"]


@pytest.mark.slow
def test_tiny_run_writes_a_row_per_case_and_every_seed(nuclei, tmp_path):
    out = tmp_path / "bench"
    args = ["--data-root", os.path.dirname(nuclei["train_json"]), "--seeds", "0", "--max-iter", "1"]
    args += ["--num-factors", "2", "--factor-seed", "3", "--crop-size", "512", "--oracle-factors", "0.5", "1"]
    args += ["--tta-min-sizes", "128", "256", "--no-tta-flip", "--timing-repeats", "1", "--output", str(out)]
    args += ["--soit-override", "model.transformer.num_queries=50", "train.scale_samples=20"]
    # one thread: two OpenMP threads slow down tenfold when the 2-core machine runs other jobs
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    factors = load_tool("benchmark_scale", "dev").draw_factors(2, seed=3)
    assert f"magnifications (factor seed 3): {factors}" in res.stdout

    results = json.loads((out / "results.json").read_text())
    # the 512 x 512 tile whole and in four crops of half its size
    names = [f"{f:g}x" for f in factors] + ["crop 512", "crop 256"]
    assert [c["name"] for c in results["cases"]] == names
    assert [c["images"] for c in results["cases"]] == [1, 1, 1, 4]
    (run,) = results["runs"]
    assert run["seed"] == 0 and run["soit_iterations"] == run["mask_rcnn_iterations"] == 1
    assert run["training_scale"]["input_size"] == [256, 256]  # the quick start's crops, measured
    for case in results["cases"]:
        r = run["cases"][case["name"]]
        assert len(r["default"]["factors"]) == len(r["default"]["looks"]) == case["images"]
        assert set(r["oracle"]["sweep"]) == {"0.5", "1"} and r["oracle"]["segm_factor"] in (0.5, 1.0)
        for entry in (r["default"], r["oracle"], r["mask_rcnn"], r["mask_rcnn_tta"]):
            assert 0 <= entry["bbox"] <= 100 and 0 <= entry["segm"] <= 100
    assert run["timing"]["default_s"] > 0 and run["timing"]["plain_s"] > 0

    table = (out / "results.md").read_text()
    assert table.strip() in res.stdout and "python dev/benchmark_scale.py --data-root" in table
    segm = table.split("Box AP")[0]
    for name in names:  # one row per case in each table
        assert segm.count(f"| {name} |") == 1 and table.count(f"| {name} |") == 2
