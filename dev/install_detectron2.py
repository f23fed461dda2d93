#!/usr/bin/env python
"""Install detectron2 v0.6 as a pure-Python wheel, from PyPI only.

detectron2 is not published on PyPI under its own name. ``pb1-detectron2==0.6`` is an sdist
whose Python sources are those of the detectron2 v0.6 release, without the C++/CUDA sources
(its own ``setup.py`` therefore cannot build). This tool:

1. keeps an upstream detectron2 that is already importable (unless ``--force``);
2. downloads that sdist from the package index (or takes ``--sdist PATH``) and checks its
   SHA-256;
3. applies, in one place, the fixes v0.6 needs on today's PyTorch, Pillow, NumPy and
   setuptools (listed in ``PATCHES`` below, each checked to apply);
4. adds a placeholder ``detectron2._C`` that raises a clear error naming the compiled op
   only when such an op is called (SOIT needs none of them);
5. builds a wheel named ``detectron2`` (kept in ``--wheel-dir`` so it can be carried to
   another machine) and installs it with pip.

Usage: python dev/install_detectron2.py [--force] [--sdist PATH] [--wheel-dir DIR]
"""
import argparse
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import urllib.request

SDIST_NAME = "pb1-detectron2-0.6.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
SIMPLE_INDEX = os.environ.get("SOIT_PYPI_SIMPLE", "https://pypi.org/simple")
WHEEL_VERSION = "0.6+pure"

# detectron2 v0.6's own runtime dependencies (its tools-only ones, black/future/pydot, dropped)
REQUIREMENTS = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]

# (file relative to the detectron2 package, pattern, replacement, why). Each must match.
PATCHES = [
    (
        "data/transforms/transform.py",
        r"Image\.LINEAR\b",
        "Image.BILINEAR",
        "PIL.Image.LINEAR was removed in Pillow 10 (it was an alias of BILINEAR)",
    ),
    (
        "model_zoo/model_zoo.py",
        r"^import pkg_resources\n",
        "",
        "pkg_resources is gone from setuptools >= 81",
    ),
    (
        "model_zoo/model_zoo.py",
        r"pkg_resources\.resource_filename\(\s*\"detectron2\.model_zoo\",\s*os\.path\.join\(\"configs\", config_path\)\s*\)",
        'os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)',
        "the configs ship inside the package: resolve them next to this file",
    ),
    (
        "export/__init__.py",
        r"^from \.api import \*\n",
        "try:\n    from .api import *  # needs caffe2, which PyTorch no longer ships\nexcept ImportError:\n    pass\n",
        "the caffe2 export API must not make TracingAdapter unimportable",
    ),
]
# NumPy 1.24 removed the aliases np.bool/np.int/np.float/np.object/np.str.
NUMPY_ALIAS = (re.compile(r"\bnp\.(bool|int|float|object|str)\b(?!_)"), r"\1")

PLACEHOLDER_C = '''\
"""Placeholder for detectron2's compiled ops.

This detectron2 was installed from its Python sources only (``dev/install_detectron2.py``
of the SOIT project), without the C++/CUDA extension. Everything that is pure Python works;
calling one of the compiled ops raises an error that names it.
"""
import torch

IS_PLACEHOLDER = True
_HINT = (
    "detectron2 was installed without its compiled extension (pure-Python build), so the "
    "compiled op {name!r} is not available. For a full build install detectron2 from its "
    "source repository (e.g. `pip install 'git+https://github.com/facebookresearch/detectron2.git'`), "
    "then re-run the SOIT set-up, which keeps an importable detectron2."
)


class CompiledOpUnavailableError(RuntimeError):
    pass


def _missing(name):
    def op(*args, **kwargs):
        raise CompiledOpUnavailableError(_HINT.format(name=name))

    op.__name__ = name
    return op


def get_compiler_version():
    return "none (pure-Python detectron2)"


def get_cuda_version():
    return "none (pure-Python detectron2)"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)


# Ops that detectron2 reaches through torch.ops rather than through this module.
_lib = torch.library.Library("detectron2", "DEF")
_lib.define("nms_rotated(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor")
_lib.impl("nms_rotated", _missing("nms_rotated"), "CompositeExplicitAutograd")
'''


def log(msg):
    print(f"[install_detectron2] {msg}", flush=True)


def detectron2_importable():
    try:
        import detectron2  # noqa: F401
    except ImportError:
        return None
    return os.path.dirname(detectron2.__file__)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_sdist(dest_dir):
    index_url = f"{SIMPLE_INDEX.rstrip('/')}/pb1-detectron2/"
    log(f"looking up {SDIST_NAME} at {index_url}")
    with urllib.request.urlopen(index_url, timeout=60) as r:
        page = r.read().decode()
    links = re.findall(r'href="([^"]*' + re.escape(SDIST_NAME) + r'[^"]*)"', page)
    if not links:
        raise SystemExit(f"{SDIST_NAME} not found on {index_url}; pass --sdist PATH to a local copy")
    url = links[0].split("#")[0]
    if not url.startswith("http"):
        url = urllib.parse.urljoin(index_url, url)
    path = os.path.join(dest_dir, SDIST_NAME)
    log(f"downloading {url}")
    urllib.request.urlretrieve(url, path)
    return path


def apply_patches(pkg_dir):
    for rel, pattern, repl, why in PATCHES:
        path = os.path.join(pkg_dir, rel)
        with open(path) as f:
            src = f.read()
        new, n = re.subn(pattern, repl, src, flags=re.MULTILINE)
        if n == 0:
            raise SystemExit(f"patch for {rel} did not apply (pattern {pattern!r}); is this detectron2 v0.6?")
        with open(path, "w") as f:
            f.write(new)
        log(f"patched {rel}: {why}")
    count = 0
    for root, _, files in os.walk(pkg_dir):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            with open(path) as f:
                src = f.read()
            new, n = NUMPY_ALIAS[0].subn(NUMPY_ALIAS[1], src)
            if n:
                with open(path, "w") as f:
                    f.write(new)
                count += n
    log(f"replaced {count} removed NumPy aliases (np.bool/np.int/np.float...) by builtins")
    with open(os.path.join(pkg_dir, "_C.py"), "w") as f:
        f.write(PLACEHOLDER_C)
    log("added the placeholder detectron2._C (clear error when a compiled op is called)")


def write_setup(build_dir):
    setup_py = f"""\
        from setuptools import find_packages, setup

        setup(
            name="detectron2",
            version="{WHEEL_VERSION}",
            description="detectron2 v0.6 Python sources (no compiled ops), patched for current PyTorch/Pillow/NumPy",
            packages=find_packages(include=["detectron2", "detectron2.*"]),
            package_data={{"detectron2.model_zoo": ["configs/**/*.py", "configs/**/*.yaml", "configs/*.yaml"]}},
            include_package_data=False,
            python_requires=">=3.7",
            install_requires={REQUIREMENTS!r},
        )
        """
    with open(os.path.join(build_dir, "setup.py"), "w") as f:
        f.write(textwrap.dedent(setup_py))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="install even if a detectron2 is importable")
    parser.add_argument("--sdist", help=f"a local {SDIST_NAME} instead of downloading it")
    parser.add_argument("--wheel-dir", default=".cache/wheels", help="where the built wheel is kept")
    parser.add_argument("--no-install", action="store_true", help="only build the wheel")
    args = parser.parse_args(argv)

    existing = detectron2_importable()
    if existing and not args.force:
        log(f"detectron2 is already importable from {existing}: keeping it")
        return 0

    with tempfile.TemporaryDirectory(prefix="d2build-") as tmp:
        sdist = args.sdist or download_sdist(tmp)
        digest = sha256(sdist)
        if digest != SDIST_SHA256:
            raise SystemExit(f"{sdist}: SHA-256 {digest} differs from the expected {SDIST_SHA256}; refusing to install")
        log(f"{os.path.basename(sdist)} verified (sha256 {digest[:12]}...)")
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("pb1-detectron2-0.6/detectron2/")]
            tar.extractall(tmp, members=members, filter="data")
        build_dir = os.path.join(tmp, "pb1-detectron2-0.6")
        apply_patches(os.path.join(build_dir, "detectron2"))
        write_setup(build_dir)
        os.makedirs(args.wheel_dir, exist_ok=True)
        wheel_dir = os.path.abspath(args.wheel_dir)
        log(f"building the wheel into {wheel_dir}")
        subprocess.check_call(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheel_dir, build_dir]
        )
    wheel = os.path.join(wheel_dir, f"detectron2-{WHEEL_VERSION}-py3-none-any.whl")
    if not os.path.exists(wheel):
        raise SystemExit(f"expected wheel {wheel} was not built")
    if args.no_install:
        log(f"built {wheel}")
        return 0
    log(f"installing {os.path.basename(wheel)}")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", wheel])
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", wheel])  # its dependencies, if any are missing
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
