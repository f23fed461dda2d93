"""dev/device_wheels.py: the wheels the GPU machine lacks, one version each, installable
without an index into a target folder that then provides detectron2 and its needs."""
import glob
import os
import subprocess
import sys

from conftest import REPO

TOOL = os.path.join(REPO, "dev", "device_wheels.py")


def test_device_wheels_install_into_a_target_and_import(tmp_path):
    out = tmp_path / "whl"
    res = subprocess.run([sys.executable, TOOL, "--output", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    wheels = sorted(os.path.basename(p) for p in glob.glob(str(out / "*.whl")))
    names = [w.split("-")[0].lower() for w in wheels]
    expected = ["antlr4_python3_runtime", "detectron2", "fvcore", "hydra_core", "iopath", "omegaconf"]
    expected += ["pycocotools", "termcolor", "yacs"]
    assert names == expected, wheels
    pycocotools = next(w for w in wheels if w.startswith("pycocotools"))
    assert "cp312" in pycocotools and "x86_64" in pycocotools  # the GPU machine's Python

    # what scripts/gpu_check.sh does there, for the pure-Python wheels (pycocotools is for 3.12)
    site = tmp_path / "site"
    pure = [str(out / w) for w in wheels if not w.startswith("pycocotools")]
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site), *pure]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    probe = "import detectron2, fvcore, omegaconf, hydra, iopath, yacs; print(detectron2.__file__, fvcore.__file__)"
    res = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)}
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert all(path.startswith(str(site)) for path in res.stdout.split()), res.stdout
