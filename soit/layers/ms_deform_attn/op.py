"""The compiled op and its registration with ``torch.library``.

* :func:`ms_deform_attn_compiled`: ``soit._C`` called directly, under an autograd function
  (what eager calls take when the extension serves the tensor);
* ``soit::ms_deform_attn`` (and its backward ``soit::ms_deform_attn_backward``), the op that
  ``torch.jit.trace`` and ``torch.compile`` record: on the CPU and CUDA it runs ``soit._C``
  when the extension serves the tensor and the PyTorch path otherwise; its fake implementation
  gives the output's shape for ``torch.compile``.
"""

from typing import List, Optional

import torch
from torch.autograd.function import once_differentiable

from . import extension
from .pytorch import ms_deform_attn_pytorch_any, ms_deform_attn_pytorch_backward

__all__ = ["ms_deform_attn_compiled"]


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
        ext = extension.compiled_module()
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
        grad_value, grad_loc, grad_weights = extension.compiled_module().ms_deform_attn_backward(
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


def ms_deform_attn_compiled(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index
):
    return _MSDeformAttnFunction.apply(
        *_kernel_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index)
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
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index)
    return ms_deform_attn_pytorch_any(*args)


@_ms_deform_attn_op.register_kernel(("cpu", "cuda"))
def _ms_deform_attn_op_compiled(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index
):
    """On the CPU and CUDA: soit._C when it serves the tensor (``extension.kernel_serves``),
    else the PyTorch path."""
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index)
    if extension.kernel_serves(value):
        return extension.compiled_module().ms_deform_attn_forward(*_kernel_inputs(*args))
    return ms_deform_attn_pytorch_any(*args)


@_ms_deform_attn_op.register_fake
def _ms_deform_attn_op_fake(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index
):
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
    return ms_deform_attn_pytorch_backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index, grad_output
    )


@_ms_deform_attn_backward_op.register_kernel(("cpu", "cuda"))
def _ms_deform_attn_backward_op_compiled(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index, grad_output
):
    if not extension.kernel_serves(value):
        return ms_deform_attn_pytorch_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index, grad_output
        )
    args = _kernel_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index)
    grads = extension.compiled_module().ms_deform_attn_backward(*args, grad_output.to(value.dtype).contiguous())
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

