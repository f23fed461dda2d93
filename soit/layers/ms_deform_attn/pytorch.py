"""Pure-PyTorch formulations of multi-scale deformable attention: they run on every device,
trace and export (``grid_sample`` is a standard ONNX operator)."""

import torch
import torch.nn.functional as F

__all__ = [
    "ms_deform_attn_pytorch",
    "ms_deform_attn_pytorch_gather",
    "ms_deform_attn_pytorch_any",
    "ms_deform_attn_pytorch_backward",
]


def _in_common_dtype(value, sampling_locations, attention_weights):
    """The three inputs in their promoted dtype."""
    dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
    return value.to(dtype), sampling_locations.to(dtype), attention_weights.to(dtype)


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
        value, sampling_locations, attention_weights = _in_common_dtype(value, sampling_locations, attention_weights)
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


def _upper(x, bound):
    """``x`` clamped from above by ``bound``: a number, or while tracing a 0-d tensor that
    the graph reads at run time."""
    return torch.minimum(x, bound) if torch.is_tensor(bound) else x.clamp(max=bound)


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
    indexing the value maps directly, without copies or a loop over them). Eager calls process
    the queries in chunks so that the gathered neighbours hold at most about ``max_elements``
    elements. Differentiable with respect to value, locations and weights.

    It traces with every size read at run time (the level sizes and starts from their
    tensors, the number of queries from the inputs), into index arithmetic, ``Gather``,
    element-wise products and a ``MatMul`` in ONNX: no ``GridSample`` (export with
    ``attention="gather"``, :func:`soit.export.export_onnx`).
    """
    out_dtype = value.dtype
    value, sampling_locations, attention_weights = _in_common_dtype(value, sampling_locations, attention_weights)
    dtype = value.dtype
    B, _, M, D = value.shape
    N, Lq, _, L, P, _ = sampling_locations.shape
    device = value.device
    tracing = torch.jit.is_tracing()
    if tracing:  # 0-d tensors: the graph reads them at run time
        shapes = [(spatial_shapes[lvl, 0], spatial_shapes[lvl, 1]) for lvl in range(L)]
        starts = [level_start_index[lvl] for lvl in range(L)]
        S = torch._shape_as_tensor(value)[1]
    else:
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        starts = [int(s) for s in level_start_index.tolist()]
        S = value.shape[1]
    if value_index is None:
        value_index = torch.arange(N, device=device)
    flat = value.reshape(-1, D)
    # row of (b, s, m) in `flat`: (b * S + s) * M + m
    b_rows = (value_index.to(device=device, dtype=torch.long) * (S * M)).view(N, 1, 1, 1)
    m_rows = torch.arange(M, device=device).view(1, 1, M, 1)
    chunk = Lq if tracing else max(1, max_elements // max(1, N * M * 4 * P * D))
    outs = []
    for q0 in range(0, max(Lq, 1), chunk):  # one (empty) pass without queries keeps the graph
        loc = sampling_locations if tracing else sampling_locations[:, q0 : q0 + chunk]
        aw = attention_weights if tracing else attention_weights[:, q0 : q0 + chunk]
        out = None
        for lvl, ((h, w), start) in enumerate(zip(shapes, starts)):
            if not tracing and h * w == 0:
                continue
            # continuous pixel position; clamped so that far-away samples stay small integers
            # (anything beyond the clamp has no corner inside the level either way)
            wf, hf = (w.to(dtype), h.to(dtype)) if tracing else (w, h)
            x = _upper((loc[:, :, :, lvl, :, 0] * wf - 0.5).clamp(min=-2.0), wf + 1)
            y = _upper((loc[:, :, :, lvl, :, 1] * hf - 0.5).clamp(min=-2.0), hf + 1)
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
                pix = start + _upper(yi.clamp(min=0), h - 1) * w + _upper(xi.clamp(min=0), w - 1)
                rows.append(b_rows + pix * M + m_rows)
                weights.append(torch.where(inside, cw * a, torch.zeros((), dtype=dtype, device=device)))
            rows = torch.stack(rows, -1).flatten(-2)  # (N, q, M, 4P)
            weights = torch.stack(weights, -1).flatten(-2)
            neighbours = flat.index_select(0, rows.reshape(-1)).view(N, -1, M, 4 * P, D)  # (N, q, M, 4P, D)
            term = (weights.unsqueeze(-2) @ neighbours).squeeze(-2)
            out = term if out is None else out + term
        if out is None:  # every level empty
            out = value.new_zeros(N, loc.shape[1], M, D)
        outs.append(out)
        if tracing:
            break
    return torch.cat(outs, 1).reshape(N, -1, M * D).to(out_dtype)


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


def ms_deform_attn_pytorch_any(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index=None
):
    """:func:`ms_deform_attn_pytorch`, or with shared value maps (``value_index``) one call per
    value map."""
    if value_index is None:
        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _ms_deform_attn_pytorch_shared(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index
    )


def ms_deform_attn_pytorch_backward(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_index, grad_output
):
    # torch.func.vjp rather than torch.autograd: inside an op's implementation the autograd
    # dispatch keys are excluded, and functorch's transforms do not depend on them
    def forward(v, loc, w):
        return ms_deform_attn_pytorch_any(v, spatial_shapes, level_start_index, loc, w, value_index)

    out, vjp = torch.func.vjp(forward, value, sampling_locations, attention_weights)
    return list(vjp(grad_output.to(out.dtype)))
