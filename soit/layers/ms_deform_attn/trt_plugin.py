"""The attention as one ONNX node that TensorRT runs with its own plugin.

TensorRT ships ``MultiscaleDeformableAttnPlugin_TRT`` (version 1, no attributes; TensorRT OSS,
``plugin/multiscaleDeformableAttnPlugin``). Its contract, which :data:`PLUGIN` records and the
exported node follows:

- inputs, in order: ``value`` (N, S, M, D) float32 or float16; ``spatial_shapes`` (L, 2)
  int32; ``level_start_index`` (L,) int32; ``sampling_locations`` (N, Lq, M, L, P, 2) and
  ``attention_weights`` (N, Lq, M, L, P), of ``value``'s type;
- output: (N, Lq, M, D) of ``value``'s type; one batch index N for the value and the
  queries.

The encoder, decoder and mask-encoder layers fit it as they are. The mask head samples one
value map per image for all of that image's instances (``value_index``): with one image (the
exported graph's case) its instances' queries are stacked into one query axis of a single
batch entry, which the contract expresses; with several value maps it cannot, and that call
takes the gather formulation instead.

In the eager forward (and in ONNX Runtime, which has no such node) the node computes what
:func:`~soit.layers.ms_deform_attn.pytorch.ms_deform_attn_pytorch_gather` computes.
"""
import torch

from .pytorch import ms_deform_attn_pytorch_gather

__all__ = ["PLUGIN", "ms_deform_attn_trt_plugin", "plugin_reference"]

PLUGIN = {
    "op_type": "MultiscaleDeformableAttnPlugin_TRT",
    # the domain ONNX Runtime's TensorRT execution provider and NVIDIA's tools give TensorRT
    # plugin nodes; TensorRT's ONNX parser finds the plugin by op_type and version
    "domain": "trt.plugins",
    "version": "1",
    "inputs": ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights"),
    "ranks": (4, 2, 1, 6, 5),
    "output_rank": 4,
}


def plugin_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """What the plugin's node computes, on its five inputs: (N, Lq, M, D) (the gather
    formulation; the int32 shapes and starts are read as they come)."""
    out = ms_deform_attn_pytorch_gather(
        value, spatial_shapes.long(), level_start_index.long(), sampling_locations, attention_weights
    )
    return out.view(value.shape[0], sampling_locations.shape[1], value.shape[2], value.shape[3])


class _PluginNode(torch.autograd.Function):
    """Forward: the gather formulation, output (N, Lq, M, D). Exported: the plugin's node."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        # computed, not recorded: the exported graph holds the node alone
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            return plugin_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        finally:
            torch._C._set_tracing_state(state)

    @staticmethod
    def symbolic(g, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        out = g.op(
            f"{PLUGIN['domain']}::{PLUGIN['op_type']}",
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            plugin_version_s=PLUGIN["version"], plugin_namespace_s="",
        )  # fmt: skip
        return out


def ms_deform_attn_trt_plugin(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index=None):
    """:func:`ms_deform_attn` (same arguments and result, (N, Lq, M * D)) through the
    plugin's node; with ``value_index`` over several value maps, the gather formulation."""
    N, Lq, M, L, P, _ = sampling_locations.shape
    D = value.shape[3]
    shapes, starts = spatial_shapes.to(torch.int32), level_start_index.to(torch.int32)
    if value_index is None:
        out = _PluginNode.apply(value, shapes, starts, sampling_locations.to(value.dtype), attention_weights.to(value.dtype))
        return out.reshape(N, -1, M * D)
    if value.shape[0] != 1:  # one batch index for value and queries: not expressible
        return ms_deform_attn_pytorch_gather(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index=value_index
        )
    # one value map shared by every group: the groups' queries side by side in one batch entry
    loc = sampling_locations.reshape(1, -1, M, L, P, 2).to(value.dtype)
    weights = attention_weights.reshape(1, -1, M, L, P).to(value.dtype)
    return _PluginNode.apply(value, shapes, starts, loc, weights).reshape(N, -1, M * D)
