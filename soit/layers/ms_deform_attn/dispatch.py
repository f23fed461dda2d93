"""Which implementation a call of :func:`ms_deform_attn` takes.

The rule, in order:

1. ``impl="pytorch"`` or ``impl="kernel"``: that one (``"kernel"`` raises when ``soit._C``
   cannot run the tensor).
2. Inside :func:`force_pytorch`, while scripting, and during ONNX or ``torch.export`` export:
   the PyTorch path (exported graphs hold standard operators only): the ``grid_sample``
   formulation, or inside :func:`export_formulation` the explicit-gather one ("gather") or
   TensorRT's plugin node ("trt_plugin").
3. While tracing or under ``torch.compile``: the registered op ``soit::ms_deform_attn``, which
   applies rule 4 each time the recorded graph runs.
4. Otherwise ``soit._C`` when it serves the tensor (CPU tensors whenever it is loaded; CUDA
   tensors when it was built with CUDA for that GPU), else the PyTorch path.

Inference on the CPU may take two fused entries of ``soit._C`` instead: where rule 4 would
run ``soit._C`` on a float32 / float64 CPU tensor, no gradient is needed and
``plain_inference()`` is not active, :func:`mask_head_kernel` gives the fused mask-head
sampling (softmax, locations, sampling and ReLU at every pixel in one pass) and
:func:`offsets_kernel` the forward from reference points and offsets in pixels (the
locations formed inside the kernel; :class:`MSDeformAttn` with point references).
"""

from typing import Callable, Optional

import torch

from ..cpu_inference import compiler_flag, plain_inference_active
from ..thread_flag import ThreadFlag
from . import extension
from .op import ms_deform_attn_compiled
from .pytorch import ms_deform_attn_pytorch_any, ms_deform_attn_pytorch_gather
from .trt_plugin import ms_deform_attn_trt_plugin

__all__ = [
    "EXPORT_FORMULATIONS", "export_formulation", "force_pytorch", "mask_head_kernel", "ms_deform_attn",
    "offsets_kernel", "route",
]  # fmt: skip

_FORCE_PYTORCH = ThreadFlag()
_EXPORT_AS = ThreadFlag()
# how exported graphs express the attention: GridSample; index arithmetic + Gather; or one
# node of TensorRT's MultiscaleDeformableAttnPlugin_TRT (trt_plugin.py)
EXPORT_FORMULATIONS = ("grid_sample", "gather", "trt_plugin")


def export_formulation(name: str):
    """A context within which (in this thread) ONNX and ``torch.export`` export write the
    attention as ``name``: "grid_sample" (``GridSample`` nodes), "gather" (corner indices,
    ``Gather`` and element-wise products: no ``GridSample``) or "trt_plugin" (TensorRT's
    plugin node, :mod:`soit.layers.ms_deform_attn.trt_plugin`)."""
    if name not in EXPORT_FORMULATIONS:
        raise ValueError(f"the attention's export formulation must be one of {EXPORT_FORMULATIONS}, got {name!r}")
    return _EXPORT_AS.set(name)


def force_pytorch(enabled: bool = True):
    """A context within which (in this thread) ``ms_deform_attn(..., impl="auto")`` and
    :class:`MSDeformAttn` use the pure-PyTorch path even where ``soit._C`` could run."""
    return _FORCE_PYTORCH.set(enabled)


def route(value: torch.Tensor, impl: str) -> str:
    """Which implementation a call takes: "kernel" (soit._C directly), "op" (the registered
    ``soit::ms_deform_attn``, recorded by tracing / torch.compile), "pytorch", or while
    exporting inside :func:`export_formulation` "gather" or "trt_plugin"."""
    if impl == "pytorch":
        return "pytorch"
    if impl == "kernel":
        ext = extension.compiled_module()
        if ext is None:
            raise RuntimeError(f"ms_deform_attn(impl='kernel'): soit._C is {extension.extension_status()}")
        if value.is_cuda and not ext.with_cuda():
            raise RuntimeError("ms_deform_attn(impl='kernel'): soit._C was built without CUDA")
        return "kernel"
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'pytorch' or 'kernel', got {impl!r}")
    if _FORCE_PYTORCH or torch.jit.is_scripting():
        return "pytorch"
    # ONNX and torch.export graphs hold standard operators only (grid_sample)
    if torch.onnx.is_in_onnx_export() or compiler_flag("is_exporting"):
        return {"gather": "gather", "trt_plugin": "trt_plugin"}.get(_EXPORT_AS.value, "pytorch")
    if torch.jit.is_tracing() or compiler_flag("is_compiling"):
        return "op"
    return "kernel" if extension.kernel_serves(value) else "pytorch"


def ms_deform_attn(
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    *,
    value_index=None,
    impl: str = "auto",
):
    """Functional multi-scale deformable attention; see :func:`ms_deform_attn_pytorch`.

    Args:
        value_index: optional (N,) long. When given, ``value`` is (B, S, M, D) holding B
            value maps shared by several queries' groups, and group n of
            ``sampling_locations`` / ``attention_weights`` (N, Lq, ...) samples
            ``value[value_index[n]]``; the value maps are never copied per group.
        impl: ``"auto"`` (default): the routing rule of this module's docstring (``soit._C``
            for CPU tensors and for CUDA tensors on a GPU it has code for, the PyTorch path
            otherwise, the PyTorch path inside :func:`force_pytorch` and in exported graphs).
            ``"pytorch"``: always the PyTorch path. ``"kernel"``: always ``soit._C``; raises
            when it is unavailable.

    The compiled op returns ``value``'s dtype; see ``op._MSDeformAttnFunction`` for its
    precision under mixed dtypes and autocast.
    """
    path = route(value, impl)
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index)
    if path == "kernel":
        return ms_deform_attn_compiled(*args)
    if path == "op":
        return torch.ops.soit.ms_deform_attn(*args)
    if path == "gather":
        return ms_deform_attn_pytorch_gather(*args[:5], value_index=value_index)
    if path == "trt_plugin":
        return ms_deform_attn_trt_plugin(*args)
    return ms_deform_attn_pytorch_any(*args)


def _inference_kernel(name: str, value: torch.Tensor, tensors) -> Optional[Callable]:
    """``soit._C.<name>`` when it may run: ``value`` and ``tensors`` are CPU tensors of one
    dtype, float32 or float64, no gradient is needed, rule 4 would run ``soit._C`` (so never
    inside :func:`force_pytorch`, while tracing or exporting) and
    :func:`~soit.layers.cpu_inference.plain_inference` is not active. None otherwise."""
    if value.device.type != "cpu" or value.dtype not in (torch.float32, torch.float64):
        return None
    if any(t.device != value.device or t.dtype != value.dtype for t in tensors):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (value, *tensors)):
        return None
    if plain_inference_active() or route(value, "auto") != "kernel":
        return None
    return getattr(extension.compiled_module(), name, None)


def mask_head_kernel(value: torch.Tensor, *tensors: torch.Tensor):
    """``soit._C.mask_head_sample`` where it may run the mask head's sampling at every pixel
    in one call (see :func:`_inference_kernel`); None otherwise: the caller composes the
    layer from :func:`ms_deform_attn`."""
    return _inference_kernel("mask_head_sample", value, tensors)


def offsets_kernel(value: torch.Tensor, *tensors: torch.Tensor):
    """``soit._C.ms_deform_attn_forward_offsets`` (the forward from reference points and
    offsets in pixels, the locations formed inside the kernel) where it may run (see
    :func:`_inference_kernel`); None otherwise."""
    return _inference_kernel("ms_deform_attn_forward_offsets", value, tensors)
