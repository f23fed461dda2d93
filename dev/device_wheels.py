#!/usr/bin/env python
"""Collect, into one ignored folder, the wheels the GPU machine lacks to run SOIT's tests.

    python dev/device_wheels.py [--output .whl] [--python-version 3.12]

The GPU machine has its own PyTorch, torchvision, timm, opencv, onnx and onnxruntime but no
network. detectron2 (the pure-Python wheel dev/install_detectron2.py builds) and what it
needs travel as wheels: the pure-Python ones are built here from the versions installed in
this environment (``pip wheel``, so sdists such as fvcore's become wheels too), pycocotools as
the CPython wheel for the machine's Python. On the machine:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site

``scripts/gpu_check.sh`` does that, builds soit._C there and runs the GPU tests and
benchmarks.
"""
import argparse
import glob
import importlib.metadata
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what detectron2 v0.6 imports and a bare GPU machine does not have
PURE = ["fvcore", "iopath", "omegaconf", "hydra-core", "antlr4-python3-runtime", "yacs", "termcolor"]
COMPILED = ["pycocotools"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def installed(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"{name} is not installed here; run scripts/setup.sh first") from None


def pip(*args):
    cmd = [sys.executable, "-m", "pip", "-q", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}{res.stderr[-3000:]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(REPO, ".whl"), help="folder for the wheels (git-ignored)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)

    detectron2 = sorted(glob.glob(os.path.join(REPO, ".cache", "wheels", "detectron2-*.whl")))
    if not detectron2:
        raise SystemExit("no detectron2 wheel in .cache/wheels: run dev/install_detectron2.py (scripts/setup.sh)")
    wanted = [f"{name}=={installed(name)}" for name in PURE]
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", args.output, *wanted)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    for name in COMPILED:
        pip(
            "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
            "--python-version", args.python_version, *platforms, "-d", args.output, f"{name}=={installed(name)}",
        )  # fmt: skip
    for path in detectron2[-1:]:
        target = os.path.join(args.output, os.path.basename(path))
        with open(path, "rb") as src, open(target, "wb") as dst:
            dst.write(src.read())

    wheels = sorted(glob.glob(os.path.join(args.output, "*.whl")))
    names = {}
    for path in wheels:  # two versions of one package stop the install on the machine
        names.setdefault(os.path.basename(path).split("-")[0].lower(), []).append(os.path.basename(path))
    duplicates = {k: v for k, v in names.items() if len(v) > 1}
    if duplicates:
        raise SystemExit(f"{args.output} holds several versions of {sorted(duplicates)}: {duplicates}; remove the old ones")
    total = sum(os.path.getsize(p) for p in wheels)
    print(f"{len(wheels)} wheels in {args.output} ({total / 2**20:.1f} MiB):")
    for path in wheels:
        print(f"  {os.path.basename(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
