"""Builds the optional compiled op ``soit._C``.

The package is fully usable without it (the pure-PyTorch path of the deformable attention
runs everywhere). The extension is built with CUDA when a CUDA compiler is found, otherwise
as a C++-only module (CPU implementation; the CUDA entry points then raise a clear error).

Environment:
    SOIT_NO_EXT=1           build no extension at all.
    SOIT_FORCE_CUDA=0/1     force the CUDA build off or on (default: on when nvcc is found).
    CUDA_HOME               CUDA toolkit root (default: $CUDA_PATH, /usr/local/cuda, or the
                            toolkit of the ``nvcc`` on ``PATH``).
    TORCH_CUDA_ARCH_LIST    GPU architectures (default: DEFAULT_CUDA_ARCH_LIST below and the
                            architectures of the GPUs visible at build time).
    MAX_JOBS                parallel compile jobs (the CUDA sources are split in two files).
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("soit", "layers", "csrc")
# Without TORCH_CUDA_ARCH_LIST: Ampere (A100) and Hopper (H100 / H200) machine code, Hopper PTX
# (which newer GPUs compile when the module loads), and the machine code of every GPU visible at
# build time. The CUDA sources do not include the ATen headers, so each architecture adds only
# seconds to the build (docs/benchmarks.md has the measured times). Set TORCH_CUDA_ARCH_LIST to
# build for other GPUs (e.g. a wheel: "8.0;8.6;8.9;9.0+PTX").
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _default_arch_list():
    archs = [DEFAULT_CUDA_ARCH_LIST]
    try:
        import torch

        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            arch = f"{major}.{minor}"
            if arch not in ("8.0", "9.0") and arch not in archs:
                archs.insert(0, arch)
    except Exception:  # no driver, no device: the default alone
        pass
    return ";".join(archs)


def _is_cuda_root(path):
    return (
        bool(path)
        and os.path.isfile(os.path.join(path, "bin", "nvcc"))
        and os.path.isdir(os.path.join(path, "include"))
    )


def _find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    if _is_cuda_root("/usr/local/cuda"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    # nvcc lives in <cuda>/bin; a symlink or a wrapper script elsewhere hides the real root
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _is_cuda_root(root):
        return root
    try:
        # the driver reports where it lives: "#$ _HERE_=/usr/local/cuda-13.0/bin"
        out = subprocess.run(
            [nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60, check=False
        )
        for line in (out.stdout + out.stderr).splitlines():
            if "_HERE_=" in line:
                cand = os.path.dirname(os.path.normpath(line.split("_HERE_=", 1)[1].strip()))
                if _is_cuda_root(cand):
                    return cand
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def get_extensions():
    if os.environ.get("SOIT_NO_EXT", "0") == "1":
        return [], {}
    cpp = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    # the CUDA build adds the kernels (*.cu) and their ATen-side launchers (cuda/*.cpp)
    cu = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    cuda_cpp = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
    if not cpp:
        return [], {}
    cuda_home = _find_cuda_home()
    force = os.environ.get("SOIT_FORCE_CUDA")
    with_cuda = bool(cu) and (cuda_home is not None if force is None else force == "1")
    if with_cuda and cuda_home is not None:
        # before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, and guesses wrong
        # from an nvcc wrapper script (e.g. /usr/local/bin/nvcc -> /usr/local)
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    define_macros = []
    include_dirs = [os.path.join(HERE, CSRC)]
    extra_compile_args = {"cxx": ["-O3"]}
    extra_link_args = []
    if sys.platform.startswith("linux"):
        # the CPU implementation's threads (ATen's OpenMP backend is header code) and its
        # `omp simd` loops; at run time the libgomp.so.1 that torch loads is shared
        extra_compile_args["cxx"].append("-fopenmp")
        extra_link_args.append("-fopenmp")
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = _default_arch_list()
        define_macros.append(("WITH_CUDA", None))
        # no fast-math: the kernels must match the PyTorch path to float32 rounding
        extra_compile_args["nvcc"] = ["-O3", "-lineinfo"]
        ext = CUDAExtension(
            "soit._C",
            cpp + cuda_cpp + cu,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    else:
        ext = CppExtension(
            "soit._C",
            cpp,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


class BuildWithConfigs(build_py):
    """``build_py`` that also copies the repository's ``configs/`` into the built package as
    ``soit/model_zoo/configs`` (what ``soit.model_zoo.get_config`` reads in an install)."""

    def run(self):
        super().run()
        source = os.path.join(HERE, "configs")
        target = os.path.join(self.build_lib, "soit", "model_zoo", "configs")
        if not os.path.isdir(source):
            raise RuntimeError(f"{source} is missing: build SOIT from a complete checkout of the repository")
        if os.path.isdir(target):
            shutil.rmtree(target)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


ext_modules, cmdclass = get_extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildWithConfigs, **cmdclass})
