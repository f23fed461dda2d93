"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021).

Shapes follow the paper's notation:
    N  batch, S  flattened value tokens (sum over levels of H_l * W_l),
    M  heads, D  channels per head, Lq queries, L levels, P points per level.

Implementations:
    * the compiled op in ``soit._C`` (CUDA kernels; a CPU version of the same arithmetic is
      reachable with ``impl="kernel"``), used automatically for CUDA tensors when the extension
      was built with CUDA;
    * :func:`ms_deform_attn_pytorch`, the ``grid_sample`` formulation: runs everywhere, traces
      and exports; the default for CPU tensors and whenever the extension is missing;
    * :func:`ms_deform_attn_pytorch_gather`, a second pure-PyTorch formulation (explicit
      gathers of the four neighbours), which indexes shared value maps without a loop.

``SOIT_NO_EXT=1`` in the environment makes the package ignore ``soit._C`` altogether;
:func:`force_pytorch` (a context manager) or ``impl="pytorch"`` selects the PyTorch path for one
region or call (export, debugging).

Export: the op is also registered with ``torch.library`` as ``soit::ms_deform_attn`` (with its
autograd and a fake implementation). ``torch.jit.trace`` and ``torch.compile`` record that op,
so a TorchScript model traced from SOIT calls the CUDA kernel on CUDA tensors and the PyTorch
path on CPU tensors; loading such a model needs ``import soit`` first (the op is defined in
Python). ONNX export (and ``torch.export``) records the ``grid_sample`` formulation instead,
with the level sizes read from ``spatial_shapes`` at run time, so the graph runs at any input
size.
"""

import contextlib
import importlib
import math
import os
import threading
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "ms_deform_attn_pytorch_gather",
    "MSDeformAttn",
    "force_pytorch",
    "has_cuda_kernel",
    "extension_status",
]

# ---------------------------------------------------------------------------------------------
# The compiled extension
# ---------------------------------------------------------------------------------------------

_EXT = {"loaded": False, "module": None, "status": ""}


def _extension():
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
    _extension()
    return _EXT["status"]


def has_cuda_kernel() -> bool:
    """True when ``soit._C`` is loaded and was built with the CUDA kernels."""
    ext = _extension()
    return ext is not None and bool(ext.with_cuda())


_DEVICE_SUPPORTED = {}


def _kernel_supports(device: torch.device) -> bool:
    """Whether soit._C holds code for this GPU: machine code of its major architecture at or
    below its minor one, or PTX of an older architecture (both show as an architecture at or
    below the GPU's). Warns once per device when not, and the PyTorch path is used there."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    supported = _DEVICE_SUPPORTED.get(index)
    if supported is None:
        major, minor = torch.cuda.get_device_capability(index)
        archs = list(_extension().cuda_arch_list())
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


_LOCAL = threading.local()


@contextlib.contextmanager
def force_pytorch(enabled: bool = True):
    """Within this context (in this thread), ``ms_deform_attn(..., impl="auto")`` and
    :class:`MSDeformAttn` use the pure-PyTorch path even for CUDA tensors."""
    previous = getattr(_LOCAL, "force_pytorch", False)
    _LOCAL.force_pytorch = enabled
    try:
        yield
    finally:
        _LOCAL.force_pytorch = previous


def _compiler_flag(name: str) -> bool:
    flag = getattr(getattr(torch, "compiler", None), name, None)
    return bool(flag is not None and flag())


def _route(value: torch.Tensor, impl: str) -> str:
    """Which implementation a call takes: "kernel" (soit._C directly), "op" (the registered
    ``soit::ms_deform_attn``, recorded by tracing / torch.compile) or "pytorch"."""
    if impl == "pytorch":
        return "pytorch"
    if impl == "kernel":
        ext = _extension()
        if ext is None:
            raise RuntimeError(f"ms_deform_attn(impl='kernel'): soit._C is {extension_status()}")
        if value.is_cuda and not ext.with_cuda():
            raise RuntimeError("ms_deform_attn(impl='kernel'): soit._C was built without CUDA")
        return "kernel"
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'pytorch' or 'kernel', got {impl!r}")
    if getattr(_LOCAL, "force_pytorch", False) or torch.jit.is_scripting():
        return "pytorch"
    # ONNX and torch.export graphs hold standard operators only (grid_sample)
    if torch.onnx.is_in_onnx_export() or _compiler_flag("is_exporting"):
        return "pytorch"
    if torch.jit.is_tracing() or _compiler_flag("is_compiling"):
        return "op"
    return "kernel" if _kernel_for(value) else "pytorch"


def _cuda_kernel_for(value: torch.Tensor) -> bool:
    return value.is_cuda and has_cuda_kernel() and _kernel_supports(value.device)


def _kernel_for(value: torch.Tensor) -> bool:
    """Whether soit._C runs this tensor's call: CUDA tensors on a GPU it has code for, CPU
    tensors whenever it is loaded."""
    if value.device.type == "cpu":
        return _extension() is not None
    return _cuda_kernel_for(value)


# ---------------------------------------------------------------------------------------------
# Pure-PyTorch formulations
# ---------------------------------------------------------------------------------------------


def _common_dtype(value, sampling_locations, attention_weights):
    return torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)


def ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Pure-PyTorch multi-scale deformable attention (``grid_sample`` formulation).

    Args:
        value: (N, S, M, D).
        spatial_shapes: (L, 2) long tensor of (H_l, W_l).
        level_start_index: (L,) long tensor, start of each level in S (read while tracing;
            eager calls split the levels by ``spatial_shapes``).
        sampling_locations: (N, Lq, M, L, P, 2), (x, y) normalised to [0, 1] of each level;
            locations outside [0, 1] sample zeros (bilinear, zero padding).
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D). When the three inputs have different dtypes, the computation runs in
        their promoted dtype and the result is cast to ``value``'s (as the compiled op does).
        Empty levels (H_l * W_l == 0) contribute zero (eager calls; a traced graph needs
        non-empty levels).
    """
    out_dtype = None
    if not (value.dtype == sampling_locations.dtype == attention_weights.dtype):
        out_dtype = value.dtype
        dtype = _common_dtype(value, sampling_locations, attention_weights)
        value = value.to(dtype)
        sampling_locations = sampling_locations.to(dtype)
        attention_weights = attention_weights.to(dtype)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    tracing = torch.jit.is_tracing()
    if tracing:
        # 0-d tensors, not Python ints: the traced graph reads the level sizes and starts at
        # run time, so it runs at input sizes other than the traced one
        shapes = [(spatial_shapes[lvl, 0], spatial_shapes[lvl, 1]) for lvl in range(L)]
        value_list = [
            value[:, level_start_index[lvl] : level_start_index[lvl] + h * w] for lvl, (h, w) in enumerate(shapes)
        ]
    else:
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        value_list = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample works on [-1, 1] with align_corners=False: pixel centres at (i + 0.5) / W.
    grids = 2 * sampling_locations - 1
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L, P)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L, P)
    # levels accumulated one at a time: no (N*M, D, Lq, L, P) stack of all samples
    out = None
    for lvl, (h, w) in enumerate(shapes):
        if not tracing and h * w == 0:  # grid_sample rejects empty inputs; an empty level samples zeros
            continue
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        # (N*M, D, Lq, P) weighted by (N*M, 1, Lq, P), summed over the points
        term = (sampled * weights[..., lvl, :]).sum(-1)
        out = term if out is None else out + term
    if out is None:  # every level empty
        out = value.new_zeros(N * M, D, Lq)
    out = out.view(N, M * D, Lq).transpose(1, 2).contiguous()
    return out if out_dtype is None else out.to(out_dtype)


def ms_deform_attn_pytorch_gather(
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    *,
    value_index=None,
    max_elements: int = 1 << 24,
):
    """Second pure-PyTorch formulation: gathers the four neighbours of every sample explicitly.

    Same arguments and result as :func:`ms_deform_attn` (``value_index`` included, handled by
    indexing the value maps directly, without copies or a loop over them). Queries are processed
    in chunks so that the gathered neighbours hold at most about ``max_elements`` elements.
    Differentiable with respect to value, locations and weights.
    """
    out_dtype = value.dtype
    dtype = _common_dtype(value, sampling_locations, attention_weights)
    value = value.to(dtype)
    sampling_locations = sampling_locations.to(dtype)
    attention_weights = attention_weights.to(dtype)
    B, S, M, D = value.shape
    N, Lq, _, L, P, _ = sampling_locations.shape
    device = value.device
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    if value_index is None:
        value_index = torch.arange(N, device=device)
    flat = value.reshape(B * S * M, D)
    # row of (b, s, m) in `flat`: (b * S + s) * M + m
    b_rows = (value_index.to(device=device, dtype=torch.long) * (S * M)).view(N, 1, 1, 1)
    m_rows = torch.arange(M, device=device).view(1, 1, M, 1)
    chunk = max(1, max_elements // max(1, N * M * 4 * P * D))
    outs = []
    for q0 in range(0, max(Lq, 1), chunk):  # one (empty) pass without queries keeps the graph
        loc = sampling_locations[:, q0 : q0 + chunk]
        aw = attention_weights[:, q0 : q0 + chunk]
        out = value.new_zeros(N, loc.shape[1], M, D)
        for lvl, ((h, w), start) in enumerate(zip(shapes, starts)):
            if h * w == 0:
                continue
            # continuous pixel position; clamped so that far-away samples stay small integers
            # (anything beyond the clamp has no corner inside the level either way)
            x = (loc[:, :, :, lvl, :, 0] * w - 0.5).clamp(-2, w + 1)
            y = (loc[:, :, :, lvl, :, 1] * h - 0.5).clamp(-2, h + 1)
            x0, y0 = x.detach().floor(), y.detach().floor()
            fx, fy = x - x0, y - y0
            x0, y0 = x0.long(), y0.long()
            a = aw[:, :, :, lvl]
            rows, weights = [], []
            for dy, dx, cw in (
                (0, 0, (1 - fy) * (1 - fx)),
                (0, 1, (1 - fy) * fx),
                (1, 0, fy * (1 - fx)),
                (1, 1, fy * fx),
            ):
                xi, yi = x0 + dx, y0 + dy
                inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                pix = start + yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)
                rows.append(b_rows + pix * M + m_rows)
                weights.append(torch.where(inside, cw * a, torch.zeros((), dtype=dtype, device=device)))
            rows = torch.stack(rows, -1).flatten(-2)  # (N, q, M, 4P)
            weights = torch.stack(weights, -1).flatten(-2)
            neighbours = flat.index_select(0, rows.reshape(-1)).view(*rows.shape, D)  # (N, q, M, 4P, D)
            out = out + (weights.unsqueeze(-2) @ neighbours).squeeze(-2)
        outs.append(out)
    return torch.cat(outs, 1).reshape(N, Lq, M * D).to(out_dtype)


def _ms_deform_attn_pytorch_shared(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index
):
    """:func:`ms_deform_attn_pytorch` with shared value maps: one call per value map, the
    groups of a map stacked along the query dimension."""
    N, Lq = sampling_locations.shape[:2]
    value_index = value_index.to(device=value.device, dtype=torch.long)
    out = None
    for b in range(value.shape[0]):
        sel = (value_index == b).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        loc = sampling_locations[sel].flatten(0, 1)[None]
        w = attention_weights[sel].flatten(0, 1)[None]
        res = ms_deform_attn_pytorch(value[b : b + 1], spatial_shapes, level_start_index, loc, w)
        if out is None:
            out = res.new_zeros(N, Lq, res.shape[-1])
        out = out.index_copy(0, sel, res.view(sel.numel(), Lq, res.shape[-1]))
    if out is None:  # no groups
        out = value.new_zeros(N, Lq, value.shape[2] * value.shape[3])
    return out


# ---------------------------------------------------------------------------------------------
# The compiled op
# ---------------------------------------------------------------------------------------------


class _MSDeformAttnFunction(torch.autograd.Function):
    """Autograd wrapper of ``soit._C.ms_deform_attn_forward`` / ``_backward``.

    Precision (also under autocast, which this function does not change: ``custom_fwd``
    without ``cast_inputs`` runs it in the ambient state, and the kernels ignore autocast):
    the output and the value gradient have ``value``'s dtype; every sum is accumulated in
    float32 (float64 for a float64 value); the value gradient is accumulated in a float32
    buffer and rounded once. Locations and weights are read in their own dtype, which is
    ``value``'s or, for a float16 / bfloat16 value, float32 (:func:`ms_deform_attn` casts
    deliberately: under autocast the softmaxed weights and the reference-point sums are
    float32, and keeping them so avoids rounding a location in a 100-pixel-wide level to
    bfloat16's 8 bits, about half a pixel). Their gradients come back in that same dtype.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index):
        ext = _extension()
        out = ext.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index
        )
        ctx.save_for_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index
        )
        return out

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index = ctx.saved_tensors
        grad_value, grad_loc, grad_weights = _extension().ms_deform_attn_backward(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            value_index,
            grad_output.to(value.dtype).contiguous(),
        )
        return _input_grads(ctx.needs_input_grad, grad_value, grad_loc, grad_weights)


def _input_grads(need, grad_value, grad_loc, grad_weights):
    """Gradients for (value, spatial_shapes, level_start_index, locations, weights,
    value_index), None where not needed."""
    return (
        grad_value if need[0] else None,
        None,
        None,
        grad_loc if need[3] else None,
        grad_weights if need[4] else None,
        None,
    )


def _coord_dtype(value_dtype, loc_dtype, weight_dtype):
    if value_dtype in (torch.float16, torch.bfloat16):
        return value_dtype if loc_dtype == weight_dtype == value_dtype else torch.float32
    return value_dtype


def _kernel_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index):
    """The arguments of ``soit._C``'s forward / backward: contiguous, on value's device,
    locations and weights in the coordinate dtype (see :class:`_MSDeformAttnFunction`)."""
    coord = _coord_dtype(value.dtype, sampling_locations.dtype, attention_weights.dtype)
    device = value.device
    if value_index is not None:
        value_index = value_index.to(device=device, dtype=torch.long).contiguous()
    return (
        value.contiguous(),
        spatial_shapes.to(device=device, dtype=torch.long).contiguous(),
        level_start_index.to(device=device, dtype=torch.long).contiguous(),
        sampling_locations.to(coord).contiguous(),
        attention_weights.to(coord).contiguous(),
        value_index,
    )


def _ms_deform_attn_kernel(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index
):
    return _MSDeformAttnFunction.apply(
        *_kernel_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index)
    )


def _pytorch_any(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index):
    if value_index is None:
        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _ms_deform_attn_pytorch_shared(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index
    )


# ---------------------------------------------------------------------------------------------
# The registered op: soit::ms_deform_attn
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("soit::ms_deform_attn", mutates_args=())
def _ms_deform_attn_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    value_index: Optional[torch.Tensor],
) -> torch.Tensor:
    """``soit::ms_deform_attn``: the PyTorch path on devices soit._C does not serve (its
    result is a new tensor, never a view of an input, as a custom op's must be)."""
    return _pytorch_any(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index)


@_ms_deform_attn_op.register_kernel(("cpu", "cuda"))
def _ms_deform_attn_op_compiled(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index
):
    """On the CPU and CUDA: soit._C when it serves the tensor (see :func:`_kernel_for`), else
    the PyTorch path."""
    if _kernel_for(value):
        args = _kernel_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index)
        return _extension().ms_deform_attn_forward(*args)
    return _pytorch_any(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index)


@_ms_deform_attn_op.register_fake
def _ms_deform_attn_op_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index):
    N, Lq = sampling_locations.shape[:2]
    return value.new_empty(N, Lq, value.shape[2] * value.shape[3])


@torch.library.custom_op("soit::ms_deform_attn_backward", mutates_args=())
def _ms_deform_attn_backward_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    value_index: Optional[torch.Tensor],
    grad_output: torch.Tensor,
) -> List[torch.Tensor]:
    """Gradients of ``soit::ms_deform_attn`` for value, locations and weights (in their
    dtypes): the PyTorch path run again under autograd, on devices soit._C does not serve."""
    return _backward_pytorch(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index, grad_output
    )


def _backward_pytorch(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index, grad_output
):
    # torch.func.vjp rather than torch.autograd: inside an op's implementation the autograd
    # dispatch keys are excluded, and functorch's transforms do not depend on them
    def forward(v, loc, w):
        return _pytorch_any(v, spatial_shapes, level_start_index, loc, w, value_index)

    out, vjp = torch.func.vjp(forward, value, sampling_locations, attention_weights)
    return list(vjp(grad_output.to(out.dtype)))


@_ms_deform_attn_backward_op.register_kernel(("cpu", "cuda"))
def _ms_deform_attn_backward_op_compiled(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index, grad_output
):
    if not _kernel_for(value):
        return _backward_pytorch(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index, grad_output
        )
    args = _kernel_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index)
    grads = _extension().ms_deform_attn_backward(*args, grad_output.to(value.dtype).contiguous())
    return [g.to(t.dtype) for g, t in zip(grads, (value, sampling_locations, attention_weights))]


@_ms_deform_attn_backward_op.register_fake
def _ms_deform_attn_backward_op_fake(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index, grad_output
):
    return [torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)]


def _ms_deform_attn_op_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.value_index = inputs[5]


def _ms_deform_attn_op_backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_weights = torch.ops.soit.ms_deform_attn_backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, ctx.value_index, grad_output
    )
    return _input_grads(ctx.needs_input_grad, grad_value, grad_loc, grad_weights)


_ms_deform_attn_op.register_autograd(_ms_deform_attn_op_backward, setup_context=_ms_deform_attn_op_setup)


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
        impl: ``"auto"`` (default): the compiled CUDA kernel for CUDA tensors when ``soit._C``
            has it, the PyTorch path otherwise; inside :func:`force_pytorch`, while scripting
            and during ONNX / ``torch.export`` export always the PyTorch path; while tracing
            or under ``torch.compile`` the registered op ``soit::ms_deform_attn`` (which
            makes the same choice when it runs). ``"pytorch"``: always the PyTorch path.
            ``"kernel"``: always ``soit._C`` (its CPU implementation for CPU tensors); raises
            when it is unavailable.

    The compiled op returns ``value``'s dtype; see :class:`_MSDeformAttnFunction` for its
    precision under mixed dtypes and autocast.
    """
    route = _route(value, impl)
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index)
    if route == "kernel":
        return _ms_deform_attn_kernel(*args)
    if route == "op":
        return torch.ops.soit.ms_deform_attn(*args)
    return _pytorch_any(*args)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module.

    Parameter names (``sampling_offsets``, ``attention_weights``, ``value_proj``,
    ``output_proj``) match the official checkpoints, so conversion is a renaming.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self):
        # Deformable DETR's init: offsets start on a ring of directions, growing with the point index.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        for i in range(self.num_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query, reference_points, value, spatial_shapes, level_start_index, value_padding_mask=None):
        """
        Args:
            query: (N, Lq, C), positional embedding already added.
            reference_points: (N, Lq, L, 2) as (x, y) in [0, 1], or (N, Lq, L, 4) as
                (cx, cy, w, h) boxes in [0, 1].
            value: (N, S, C), the flattened multi-level features.
            spatial_shapes: (L, 2) long, (H_l, W_l).
            level_start_index: (L,) long.
            value_padding_mask: (N, S) bool, True at padding (those values are zeroed).

        Returns:
            (N, Lq, C).
        """
        N, Lq, _ = query.shape
        M, L, P = self.num_heads, self.num_levels, self.num_points
        v = self.value_proj(value)
        if value_padding_mask is not None:
            v = v.masked_fill(value_padding_mask[..., None], 0.0)
        v = v.view(N, v.shape[1], M, self.embed_dim // M)
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by (W_l, H_l)
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points must end in 2 (points) or 4 (boxes), got shape {tuple(reference_points.shape)}"
            )
        out = ms_deform_attn(v, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)
