"""Builds the optional compiled op ``soit._C``.

The package is fully usable without it (the pure-PyTorch path of the deformable attention
runs everywhere). The extension is built with CUDA when a CUDA compiler is found
(``CUDA_HOME`` or ``nvcc`` on ``PATH``), otherwise as a C++-only module.

Environment:
    SOIT_NO_EXT=1           build no extension at all.
    SOIT_FORCE_CUDA=0/1     force the CUDA build off or on (default: on when nvcc is found).
    TORCH_CUDA_ARCH_LIST    GPU architectures (default below: Ampere and Hopper).
"""
import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("soit", "layers", "csrc")
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def _find_cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    # nvcc lives in <cuda>/bin; torch otherwise guesses the wrong root from a symlinked nvcc
    real = os.path.realpath(nvcc)
    return os.path.dirname(os.path.dirname(real))


def get_extensions():
    if os.environ.get("SOIT_NO_EXT", "0") == "1":
        return [], {}
    cpp = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    cu = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    if not cpp:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cuda_home = _find_cuda_home()
    force = os.environ.get("SOIT_FORCE_CUDA")
    with_cuda = bool(cu) and (cuda_home is not None if force is None else force == "1")
    define_macros = []
    extra_compile_args = {"cxx": ["-O3"]}
    if with_cuda:
        os.environ.setdefault("CUDA_HOME", cuda_home)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3", "--use_fast_math", "-std=c++17"]
        ext = CUDAExtension(
            "soit._C", cpp + cu, define_macros=define_macros, extra_compile_args=extra_compile_args
        )
    else:
        ext = CppExtension("soit._C", cpp, define_macros=define_macros, extra_compile_args=extra_compile_args)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = get_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
