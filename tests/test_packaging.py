"""A wheel built from a clean copy of the repository carries the configs: get_config and the
library defaults that need a config work from the installed package alone (the model builds,
the released checkpoint layout converts against the packaged config, the Predictor runs)."""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import torch
from conftest import REPO, shared_file

from soit.model_zoo import configs_root, get_config, get_config_file


def test_get_config_from_the_checkout():
    assert get_config_file("soit_r50_50ep.py") == os.path.join(REPO, "configs", "soit_r50_50ep.py")
    assert configs_root() == os.path.join(REPO, "configs")
    cfg = get_config("models/soit_tiny.py")
    assert cfg.model.transformer.num_queries == 30
    import pytest

    with pytest.raises(FileNotFoundError, match=r"'soit_r50.py' is not a SOIT config; available: .*models/soit_r50.py"):
        get_config_file("soit_r50.py")
    with pytest.raises(FileNotFoundError, match="is not a SOIT config"):
        get_config_file("../setup.py")


def test_wheel_ships_configs_and_installed_package_uses_them(tmp_path):
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # no git, or not a git checkout
        tracked = []
    if not tracked:  # an exported tree without git: copy what is there
        tracked = [os.path.relpath(os.path.join(d, f), REPO) for d, _, fs in os.walk(REPO) for f in fs]
    source = tmp_path / "src"
    for rel in tracked:
        top = rel.split(os.sep, 1)[0]
        if top.startswith(".") or top in ("output", "datasets", "build", "dist") or rel.endswith((".so", ".pyc")):
            continue
        if not os.path.isfile(os.path.join(REPO, rel)):
            continue
        os.makedirs(source / os.path.dirname(rel), exist_ok=True)
        shutil.copy2(os.path.join(REPO, rel), source / rel)
    env = dict(os.environ, SOIT_NO_EXT="1", PIP_NO_INDEX="1")
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = dist.glob("soit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for config in ("soit_r50_50ep.py", "models/soit_r50.py", "common/optim.py", "quickstart/soit_nuclei_cpu.py"):
        assert f"soit/model_zoo/configs/{config}" in names

    # a new environment that sees this one's dependencies but not this checkout
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    with open(os.path.join(site, "dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")  # a plain path: its .pth files (our editable install) are not read
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", site, str(wheel)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    # the released checkpoint layout, as a user downloads it
    official = tmp_path / "official.pth"
    fixture = torch.load(shared_file("fixtures", "official_small.pt"), weights_only=True)
    torch.save({"state_dict": fixture["state_dict"]}, official)
    check = (
        "import numpy as np, torch, soit, soit.model_zoo as z\n"
        "from detectron2.config import instantiate\n"
        "from soit.checkpoint.official import _default_config_file, convert_checkpoint\n"
        "from soit.engine import Predictor\n"
        "print(soit.__file__)\n"
        "print(z.configs_root())\n"
        "print(_default_config_file())\n"
        "cfg = z.get_config('soit_r50_50ep.py')\n"
        "model = instantiate(cfg.model)\n"
        "print(cfg.model.transformer.num_queries, cfg.optimizer.lr, type(model).__name__)\n"
        # the converter checks names and shapes against a model built from the packaged config
        f"summary = convert_checkpoint({str(official)!r}, {str(tmp_path / 'converted.pth')!r})\n"
        "print(summary['num_tensors'], summary['architecture']['depth'])\n"
        "predictor = Predictor(z.get_config_file('quickstart/soit_nuclei_cpu.py'))\n"
        "image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)\n"
        "inst = predictor(image)\n"
        "print(tuple(inst.image_size), tuple(inst.pred_masks.shape[1:]))\n"
    )
    done = subprocess.run([python, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    package, root, default, values, converted, predicted = done.stdout.strip().splitlines()[-6:]
    assert package.startswith(site) and root == os.path.join(site, "soit", "model_zoo", "configs")
    assert default == os.path.join(root, "models", "soit_r50.py")
    assert values == "300 0.0002 SOIT"
    assert converted == "247 18", converted
    assert predicted == "(96, 128) (96, 128)", predicted
