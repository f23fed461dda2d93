"""Loading the compiled extension ``soit._C`` and what it can run.

``soit._C`` is optional: it is absent when the package was installed without a compiler (or
with ``SOIT_NO_EXT=1`` at build time), and ignored when ``SOIT_NO_EXT=1`` is set at run time.
Nothing here raises when it is missing; :func:`extension_status` says why it is not used.
"""

import importlib
import os
import warnings

import torch

__all__ = ["compiled_module", "extension_status", "has_cuda_kernel", "gpu_supported", "kernel_serves"]

_EXT = {"loaded": False, "module": None, "status": ""}


def compiled_module():
    """``soit._C``, or None when it is absent, disabled or fails to load (never raises)."""
    if not _EXT["loaded"]:
        _EXT["loaded"] = True
        if os.environ.get("SOIT_NO_EXT", "0") == "1":
            _EXT["status"] = "disabled (SOIT_NO_EXT=1)"
        else:
            try:
                _C = importlib.import_module("soit._C")
            except ModuleNotFoundError as e:
                if e.name != "soit._C":
                    raise
                _EXT["status"] = "not built"
            except (ImportError, OSError) as e:  # e.g. built against another torch
                _EXT["status"] = f"failed to load: {e}"
                warnings.warn(
                    f"soit._C {_EXT['status']}; multi-scale deformable attention uses the PyTorch path. "
                    "Rebuild with `pip install -e . --no-build-isolation`.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            else:
                _EXT["module"] = _C
                if _C.with_cuda():
                    archs = ",".join(f"sm_{a}" for a in _C.cuda_arch_list())
                    _EXT["status"] = f"loaded with CUDA {_C.cuda_version()} ({archs})"
                else:
                    _EXT["status"] = "loaded without CUDA (C++ only)"
    return _EXT["module"]


def extension_status() -> str:
    """A one-line description of ``soit._C``: loaded (with or without CUDA), not built, disabled."""
    compiled_module()
    return _EXT["status"]


def has_cuda_kernel() -> bool:
    """True when ``soit._C`` is loaded and was built with the CUDA kernels."""
    ext = compiled_module()
    return ext is not None and bool(ext.with_cuda())


_DEVICE_SUPPORTED = {}


def gpu_supported(device: torch.device) -> bool:
    """Whether soit._C holds code for this GPU: machine code of its major architecture at or
    below its minor one, or PTX of an older architecture (both show as an architecture at or
    below the GPU's). Warns once per device when not, and the PyTorch path is used there."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    supported = _DEVICE_SUPPORTED.get(index)
    if supported is None:
        major, minor = torch.cuda.get_device_capability(index)
        archs = list(compiled_module().cuda_arch_list())
        supported = bool(archs) and min(archs) <= major * 10 + minor
        if not supported:
            warnings.warn(
                f"soit._C has no code for {torch.cuda.get_device_name(index)} (sm_{major}{minor}; built for "
                f"{archs}); multi-scale deformable attention uses the PyTorch path on it. Rebuild with "
                f"TORCH_CUDA_ARCH_LIST={major}.{minor}.",
                RuntimeWarning,
                stacklevel=4,
            )
        _DEVICE_SUPPORTED[index] = supported
    return supported


def cuda_kernel_serves(value: torch.Tensor) -> bool:
    """Whether soit._C runs this CUDA tensor's call (built with CUDA, with code for its GPU)."""
    return value.is_cuda and has_cuda_kernel() and gpu_supported(value.device)


def kernel_serves(value: torch.Tensor) -> bool:
    """Whether soit._C runs this tensor's call: CUDA tensors on a GPU it has code for, CPU
    tensors whenever it is loaded."""
    if value.device.type == "cpu":
        return compiled_module() is not None
    return cuda_kernel_serves(value)
