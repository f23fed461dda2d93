"""dev/benchmark.py on the CPU: SOIT and detectron2's Mask R-CNN measured in one run."""
import json
import os
import subprocess
import sys

from conftest import REPO


def test_benchmark_measures_soit_and_mask_rcnn(tmp_path):
    out = tmp_path / "rows.json"
    models = ["soit", "soit_pytorch_attn", "soit_plain", "mask_rcnn"]
    args = ["--device", "cpu", "--models", *models, "--size", "128", "160", "--runs", "1"]
    args += ["--warmup", "0", "--throughput-batch", "0", "--train-runs", "1", "--markdown", "--json", str(out)]
    args += ["--stages", "1"]
    res = subprocess.run(
        [sys.executable, os.path.join(REPO, "dev", "benchmark.py"), *args], capture_output=True, text=True, cwd=REPO
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["size"] == [128, 160] and result["device"].startswith("CPU")
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == set(models)
    for row in rows.values():
        # a training step raises on a non-finite loss: random FrozenBN statistics were calibrated
        assert row["latency_ms"] > 0 and row["train_fp32_ms"] > 0, row
        assert "train_bf16_ms" not in row, "the CPU default is fp32 only"
    assert "SOIT latency vs mask_rcnn:" in res.stdout
    assert "SOIT latency vs soit_pytorch_attn:" in res.stdout
    assert "| soit |" in res.stdout and "| mask_rcnn |" in res.stdout
    # stage times of the SOIT rows: every stage measured, and they add up to the call
    assert set(result["stages"]) == {"soit", "soit_pytorch_attn", "soit_plain"}
    for stages in result["stages"].values():
        assert all(stages[k] > 0 for k in ("backbone", "encoder", "decoder", "mask_head", "postprocess")), stages
        assert abs(sum(v for k, v in stages.items() if k != "total") - stages["total"]) < 1e-6


def test_benchmark_rejects_unknown_models():
    res = subprocess.run(
        [sys.executable, os.path.join(REPO, "dev", "benchmark.py"), "--device", "cpu", "--models", "yolo"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "yolo" in res.stderr
