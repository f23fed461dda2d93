"""dev/benchmark_small_data.py end to end on a COCO train/test pair given as files."""
import json
import os
import subprocess
import sys

from conftest import REPO

TOOL = os.path.join(REPO, "dev", "benchmark_small_data.py")


def test_benchmark_trains_soit_and_mask_rcnn_and_prints_tables(nuclei, tmp_path):
    out = tmp_path / "bench"
    args = ["--train-json", nuclei["train_json"], "--train-images", nuclei["image_root"]]
    args += ["--test-json", nuclei["val_json"], "--test-images", nuclei["image_root"]]
    args += ["--soit", "tiny=configs/quickstart/soit_nuclei_cpu.py", "model.transformer.num_queries=50"]
    args += ["--inference", "tiled", "tile_size=256", "tile_overlap=64"]
    args += ["--max-iter", "2", "--seeds", "0", "1", "--test-scales", "1", "0.5", "--output", str(out), "--save-models"]
    res = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == ["mask_rcnn", "tiny", "tiny/tiled"]
    for name, runs in results.items():
        assert [r["seed"] for r in runs] == [0, 1]
        for r in runs:
            assert r["iterations"] == 2 and r["seconds"] > 0
            assert set(r["ap"]) == {"1.0", "0.5"}
            for ap in r["ap"].values():
                # NaN: no detection at all after two iterations (COCOEvaluator's convention)
                assert set(ap) == {"bbox", "segm"} and all(0 <= v <= 100 or v != v for v in ap.values())
    # mean ± std table at the 1x scale, then every seed at every scale
    assert "| model | iterations | s/iter | bbox AP | segm AP |" in res.stdout
    assert "| tiny/tiled | 2 |" in res.stdout
    assert "| mask_rcnn | 1 | " in res.stdout and "1x bbox / segm | 0.5x bbox / segm" in res.stdout
    assert res.stdout.strip().endswith((out / "results.md").read_text().strip())

    # each seed's saved model, evaluated again without training ("{seed}" in the override)
    again = tmp_path / "again"
    args = ["--train-json", nuclei["train_json"], "--train-images", nuclei["image_root"]]
    args += ["--test-json", nuclei["val_json"], "--test-images", nuclei["image_root"], "--no-mask-rcnn"]
    args += ["--soit", "tiny=configs/quickstart/soit_nuclei_cpu.py", "model.transformer.num_queries=50",
             f"train.init_checkpoint={out}/models/tiny_seed{{seed}}.pth"]  # fmt: skip
    args += ["--seconds", "0", "--seeds", "0", "1", "--test-scales", "1", "0.5", "--output", str(again)]
    res = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    evaluated = json.loads((again / "results.json").read_text())["results"]["tiny"]
    for first, second in zip(results["tiny"], evaluated):
        # as text: NaN (no detection) equals NaN there
        assert second["iterations"] == 0 and json.dumps(second["ap"]) == json.dumps(first["ap"])


def test_benchmark_names_bad_arguments(tmp_path):
    missing = str(tmp_path / "missing.py")
    for args, message in [
        (["--soit", f"x={missing}"], "does not exist"),
        (["--soit", "noconfig"], "NAME=CONFIG"),
        (["--train-json", "a.json"], "go together"),
        (["--inference", "tiled", "tile_size"], "KEY=VALUE"),
    ]:
        res = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=REPO)
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr[-500:])
