"""FLOP and activation counting for SOIT with fvcore / detectron2 conventions.

One FLOP is one fused multiply-add, as fvcore counts (a convolution or linear layer counts
its multiply-adds). The graph counted is the one that export traces
(:func:`soit.export.trace_adapter`): pixels of the network input to detections in the
network input size; resizing them to the original image size is left out, as it depends
on the original size.

Our multi-scale deformable attention appears in traced graphs as the op
``soit::ms_deform_attn``; fvcore does not know it, so it would be skipped. Its handle here
counts, per sampling point and channel, 4 multiply-adds for the bilinear interpolation
(fvcore's own count for ``grid_sampler``) and 1 for the attention weight:
5 * N * Lq * M * L * P * D.
"""
from typing import Any, Dict, List

import torch
from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape

from .export import trace_adapter

__all__ = [
    "ms_deform_attn_flop_jit",
    "baddbmm_flop_jit",
    "sdpa_flop_jit",
    "flop_count_analysis",
    "activation_count_analysis",
]

MS_DEFORM_ATTN_OP = "soit::ms_deform_attn"

# elementwise work fvcore would report as "skipped"; detectron2's FlopCountAnalysis ignores
# the same kind of ops
_IGNORED_OPS = (
    "aten::abs", "aten::add", "aten::add_", "aten::cumsum", "aten::div", "aten::div_", "aten::exp",
    "aten::log", "aten::mul", "aten::mul_", "aten::neg", "aten::relu", "aten::relu_", "aten::rsub",
    "aten::sigmoid", "aten::sin", "aten::cos", "aten::softmax", "aten::sub", "aten::sum", "aten::max_pool2d",
    "aten::topk", "aten::_shape_as_tensor", "aten::prod", "aten::all", "aten::flip", "aten::clamp", "aten::clamp_min", "aten::minimum", "aten::gt",
    "aten::ge", "aten::lt", "aten::le", "aten::pow", "aten::floor_divide", "aten::remainder", "aten::where",
    "aten::constant_pad_nd", "aten::pad", "aten::masked_fill", "aten::gather", "aten::index",
    "aten::repeat_interleave", "aten::log_", "aten::bitwise_not", "aten::__or__", "aten::__and__",
    "aten::logical_or", "aten::logical_and", "aten::meshgrid", "aten::reciprocal", "aten::sqrt",
)  # fmt: skip


# normalisation, resizing and padding outputs are not counted as activations (fvcore counts
# the outputs of convolutions, linear layers and matrix products)
_NOT_ACTIVATIONS = (
    "aten::batch_norm", "aten::group_norm", "aten::layer_norm", "aten::upsample_nearest2d",
    "aten::upsample_bilinear2d", "aten::pad",
)  # fmt: skip


def ms_deform_attn_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """FLOPs of ``soit::ms_deform_attn(value, spatial_shapes, level_start_index,
    sampling_locations, attention_weights, value_index)``: value (B, S, M, D),
    locations (N, Lq, M, L, P, 2)."""
    value = get_shape(inputs[0])
    locations = get_shape(inputs[3])
    if value is None or locations is None or len(value) != 4 or len(locations) != 6:
        raise ValueError(f"unexpected {MS_DEFORM_ATTN_OP} inputs: value {value}, sampling_locations {locations}")
    N, Lq, M, L, P, _ = locations
    D = value[3]
    return 5 * N * Lq * M * L * P * D


def baddbmm_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``baddbmm(input, batch1 (b, n, m), batch2 (b, m, p))``: b * n * m * p multiply-adds."""
    b, n, m = get_shape(inputs[1])
    p = get_shape(inputs[2])[-1]
    return b * n * m * p


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``scaled_dot_product_attention(q (..., Lq, E), k (..., Lk, E), v (..., Lk, Ev))``:
    the two matrix products, Lq * Lk * (E + Ev) multiply-adds per batch and head."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = 1
    for s in q[:-2]:
        batch *= s
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _output_numel(inputs: List[Any], outputs: List[Any]) -> int:
    shape = get_shape(outputs[0])
    numel = 1
    for s in shape:
        numel *= s
    return numel


def flop_count_analysis(model, image: torch.Tensor) -> FlopCountAnalysis:
    """fvcore ``FlopCountAnalysis`` of the model on one network-input image (3, H, W),
    with the deformable attention counted (see the module docstring)."""
    adapter = trace_adapter(model, image)
    analysis = FlopCountAnalysis(adapter, adapter.flattened_inputs)
    handles: Dict[str, Any] = {op: None for op in _IGNORED_OPS}
    handles.update(
        {
            MS_DEFORM_ATTN_OP: ms_deform_attn_flop_jit,
            "aten::baddbmm": baddbmm_flop_jit,
            "aten::scaled_dot_product_attention": sdpa_flop_jit,
        }
    )
    return analysis.set_op_handle(**handles)


def activation_count_analysis(model, image: torch.Tensor) -> ActivationCountAnalysis:
    """fvcore ``ActivationCountAnalysis`` (outputs of convolutions, linear layers, matrix
    products and the deformable attention)."""
    adapter = trace_adapter(model, image)
    analysis = ActivationCountAnalysis(adapter, adapter.flattened_inputs)
    handles: Dict[str, Any] = {op: None for op in _IGNORED_OPS + _NOT_ACTIVATIONS}
    for op in (MS_DEFORM_ATTN_OP, "aten::baddbmm", "aten::scaled_dot_product_attention"):
        handles[op] = _output_numel
    return analysis.set_op_handle(**handles)

