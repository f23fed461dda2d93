"""dev/criterion_memory.py: the loss phase's peak memory per config, each row in its own process."""
import json
import os
import subprocess
import sys

from conftest import REPO

DN = "model.denoising={_target_:soit.modeling.DenoisingQueries,num_classes:80,embed_dim:64,groups:2}"


def test_rows_report_memory_and_the_masks_they_predict(tmp_path):
    out = tmp_path / "rows.json"
    args = ["--config", "configs/quickstart/soit_nuclei_cpu.py", "--size", "96", "128", "--objects", "4",
            "--threads", "1", "--json", str(out), "--row", "paper",
            "--row", "extra_dense", "model.transformer.num_queries_one2many=40", DN,
            "--row", "extra_points", "model.transformer.num_queries_one2many=40", DN,
            "model.criterion.extra_mask_loss_points=16", "model.criterion.extra_mask_loss_layers=1"]  # fmt: skip
    res = subprocess.run(
        [sys.executable, os.path.join(REPO, "dev", "criterion_memory.py"), *args],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"paper", "extra_dense", "extra_points"}
    # 2 decoder layers x 4 objects; one-to-many x6 repeats; denoising 2 groups of 4 positives
    assert rows["paper"]["masks"] == 2 * 4
    assert rows["extra_dense"]["masks"] == 2 * 4 + 2 * 24 + 2 * 8
    assert rows["extra_points"]["masks"] == 2 * 4 + 24 + 8
    assert all(r["peak_mib"] > 0 and r["seconds"] > 0 for r in rows.values())
    assert "| extra_points | 40 |" in res.stdout


def test_a_failing_row_is_named(tmp_path):
    res = subprocess.run(
        [sys.executable, os.path.join(REPO, "dev", "criterion_memory.py"), "--config",
         "configs/quickstart/soit_nuclei_cpu.py", "--size", "64", "64", "--objects", "2", "--row", "bad",
         "model.criterion.no_such_option=1"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert res.returncode != 0 and "row 'bad' failed" in res.stderr
