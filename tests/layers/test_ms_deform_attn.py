"""Multi-scale deformable attention: the PyTorch paths, the compiled op (its CPU build here, the
CUDA kernels on a GPU machine), dispatch, the module, and the package without the extension.

The CUDA kernels' logic is also checked without a GPU by test_ms_deform_attn_emulated.py.
"""

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from soit.layers.ms_deform_attn import (
    MSDeformAttn,
    extension_status,
    force_pytorch,
    has_cuda_kernel,
    ms_deform_attn,
    ms_deform_attn_pytorch,
    ms_deform_attn_pytorch_gather,
)
from soit.modeling.transformer import flatten_spatial_shapes

# the package's modules (soit.layers re-exports a function named like the package)
ext_mod = importlib.import_module("soit.layers.ms_deform_attn.extension")
dispatch_mod = importlib.import_module("soit.layers.ms_deform_attn.dispatch")
op_mod = importlib.import_module("soit.layers.ms_deform_attn.op")
pytorch_mod = importlib.import_module("soit.layers.ms_deform_attn.pytorch")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NO_EXT = os.environ.get("SOIT_NO_EXT", "0") == "1"
EXT_LOADED = extension_status().startswith("loaded")
CUDA_KERNEL = torch.cuda.is_available() and has_cuda_kernel()
# (test_extension_is_built fails when the extension is missing; the tests that use it skip)
needs_ext = pytest.mark.skipif(not EXT_LOADED, reason=f"soit._C is {extension_status()}")
needs_gpu = pytest.mark.skipif(
    not CUDA_KERNEL,
    reason="needs a CUDA device and soit._C built with CUDA"
    + ("" if torch.cuda.is_available() else " (no CUDA device on this machine)"),
)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def make_inputs(
    N=2,
    Lq=5,
    M=2,
    D=3,
    shapes=((4, 5), (3, 2), (1, 3)),
    P=2,
    dtype=torch.float64,
    device="cpu",
    B=None,
    spread=(-0.3, 1.3),
    seed=0,
):
    """Random inputs; locations uniform in `spread` (so some fall outside [0, 1]). With B, the
    value holds B maps and a value_index (N,) is returned as well."""
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes, dtype=torch.long).view(-1, 2)
    areas = ss[:, 0] * ss[:, 1]
    lsi = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), ss.shape[0]
    nb = N if B is None else B
    value = torch.randn(nb, S, M, D, generator=g, dtype=torch.float64)
    lo, hi = spread
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo
    w = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64)
    vi = None if B is None else torch.randint(0, B, (N,), generator=g)
    conv = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return (
        conv(value),
        ss.to(device),
        lsi.to(device),
        conv(loc),
        conv(w),
        None if vi is None else vi.to(device),
    )


def run_with_grads(fn, value, ss, lsi, loc, w, vi, grad_out=None, seed=1):
    """fn's output and the gradients of value, locations and weights for a random grad_out."""
    value, loc, w = (t.detach().clone().requires_grad_() for t in (value, loc, w))
    out = fn(value, ss, lsi, loc, w, vi)
    if grad_out is None:
        g = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(
        out, (value, loc, w), grad_out.to(device=out.device, dtype=out.dtype), allow_unused=True
    )
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip((value, loc, w), grads)]
    return out.detach(), grads, grad_out


def pytorch_impl(value, ss, lsi, loc, w, vi):
    return ms_deform_attn(value, ss, lsi, loc, w, value_index=vi, impl="pytorch")


def kernel_impl(value, ss, lsi, loc, w, vi):
    return ms_deform_attn(value, ss, lsi, loc, w, value_index=vi, impl="kernel")


def reference(value, ss, lsi, loc, w, vi, grad_out):
    """The PyTorch path in float64 on the same (possibly rounded) inputs, on the CPU."""
    to64 = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    return run_with_grads(
        pytorch_impl, to64(value), ss.cpu(), lsi.cpu(), to64(loc), to64(w), None if vi is None else vi.cpu(), grad_out
    )


def assert_scaled_close(actual, expected, rtol, atol_rel, what=""):
    """|actual - expected| <= atol_rel * max|expected| + rtol * |expected|, in float64."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol_rel * scale + 1e-300, msg=lambda m: f"{what}: {m}"
    )


def run_and_reference(impl, inputs):
    """impl's output and gradients, and the float64 reference's for the same output gradient
    (rounded to the output's dtype, as impl receives it)."""
    out, grads, go = run_with_grads(impl, *inputs)
    ref_out, ref_grads, _ = reference(*inputs, go.to(out.dtype).to(torch.float64))
    return out, grads, ref_out, ref_grads


def compare(impl, inputs, rtol, atol_rel, grad_rtol=None, grad_atol_rel=None):
    """impl against the float64 PyTorch reference: output and the three gradients."""
    out, grads, ref_out, ref_grads = run_and_reference(impl, inputs)
    assert out.dtype == inputs[0].dtype
    assert_scaled_close(out, ref_out, rtol, atol_rel, "output")
    grtol = rtol if grad_rtol is None else grad_rtol
    gatol = atol_rel if grad_atol_rel is None else grad_atol_rel
    for name, g, rg, inp in zip(("value", "locations", "weights"), grads, ref_grads, (inputs[0], inputs[3], inputs[4])):
        assert g.dtype == inp.dtype, f"grad of {name} has dtype {g.dtype}, input {inp.dtype}"
        assert_scaled_close(g, rg, grtol, gatol, f"grad {name}")


# ---------------------------------------------------------------------------------------------
# the PyTorch paths
# ---------------------------------------------------------------------------------------------


def test_gradcheck_pytorch_path():
    value, ss, lsi, loc, w, _ = make_inputs(N=2, Lq=3, M=2, D=2, P=2)
    assert ((loc < 0) | (loc > 1)).any(), "some locations must be outside [0, 1]"
    inputs = tuple(t.requires_grad_() for t in (value, loc, w))
    fn = lambda v, lo, wt: ms_deform_attn_pytorch(v, ss, lsi, lo, wt)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_gradcheck_pytorch_shared_value_maps():
    value, ss, lsi, loc, w, vi = make_inputs(N=3, Lq=2, M=2, D=2, P=2, B=2, seed=3)
    inputs = tuple(t.requires_grad_() for t in (value, loc, w))
    fn = lambda v, lo, wt: ms_deform_attn(v, ss, lsi, lo, wt, value_index=vi, impl="pytorch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_known_values():
    # one level of 2 x 3 pixels, one head, one channel, one point
    value = torch.arange(6, dtype=torch.float64).view(1, 6, 1, 1)  # pixel (y, x) holds 3 y + x
    ss, lsi = torch.tensor([[2, 3]]), torch.tensor([0])

    def sample(x, y, weight=1.0):
        loc = torch.tensor([x, y], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
        w = torch.full((1, 1, 1, 1, 1), weight, dtype=torch.float64)
        out = {}
        for impl in ("pytorch", "gather") + (("kernel",) if EXT_LOADED else ()):
            if impl == "gather":
                out[impl] = ms_deform_attn_pytorch_gather(value, ss, lsi, loc, w).item()
            else:
                out[impl] = ms_deform_attn(value, ss, lsi, loc, w, impl=impl).item()
        assert len(set(round(v, 12) for v in out.values())) == 1, out
        return out["pytorch"]

    assert sample(2.5 / 3, 1.5 / 2) == pytest.approx(5.0)  # centre of pixel (1, 2)
    assert sample(0.5 / 3, 0.5 / 2, weight=0.5) == pytest.approx(0.0)
    assert sample(1.0 / 3, 0.5 / 2) == pytest.approx(0.5)  # halfway between pixels 0 and 1
    assert sample(1.0 / 3, 1.0 / 2) == pytest.approx((0 + 1 + 3 + 4) / 4)
    # a quarter pixel left of pixel (0, 0)'s centre: zero padding blends in 1/4 of zero
    assert sample(0.25 / 3, 0.5 / 2) == pytest.approx(0.0)
    assert sample(0.25 / 3, 1.5 / 2) == pytest.approx(0.75 * 3)
    # beyond half a pixel outside: nothing left
    assert sample(-0.6 / 3, 0.5) == 0.0
    assert sample(0.5, 1.3) == 0.0
    assert sample(0.5, 1.2) == pytest.approx(0.1 * 4)  # 0.1 of row 1 left at y = 1.2
    assert sample(0.5, float(1e6)) == 0.0


def test_far_out_of_range_gives_zero_output_and_gradients():
    value, ss, lsi, loc, w, _ = make_inputs(spread=(1.6, 3.0))
    out, grads, _ = run_with_grads(pytorch_impl, value, ss, lsi, loc, w, None)
    assert out.abs().max() == 0
    assert all(g.abs().max() == 0 for g in grads)


def test_shared_value_maps_equal_copies():
    value, ss, lsi, loc, w, vi = make_inputs(N=5, B=2, seed=4)
    assert len(set(vi.tolist())) == 2
    out, grads, go = run_with_grads(pytorch_impl, value, ss, lsi, loc, w, vi)
    # the same with the maps copied per group
    v = value.detach().clone().requires_grad_()
    copied_out, copied_grads, _ = run_with_grads(
        lambda vv, *a: ms_deform_attn_pytorch(vv[vi], *a[:4]), v, ss, lsi, loc, w, None, go
    )
    torch.testing.assert_close(out, copied_out)
    for g, cg in zip(grads, copied_grads):
        torch.testing.assert_close(g, cg)


@pytest.mark.parametrize("shared", [False, True])
def test_gather_formulation_matches_grid_sample(shared):
    inputs = make_inputs(N=3, Lq=7, M=2, D=4, P=3, B=2 if shared else None, seed=5)
    compare(
        lambda *a: ms_deform_attn_pytorch_gather(*a[:5], value_index=a[5], max_elements=200),  # several chunks
        inputs,
        rtol=1e-12,
        atol_rel=1e-12,
    )


@pytest.mark.parametrize("impl", ["pytorch", "gather"])
def test_zero_queries_and_empty_levels(impl):
    fn = pytorch_impl if impl == "pytorch" else lambda *a: ms_deform_attn_pytorch_gather(*a[:5], value_index=a[5])
    # no queries
    value, ss, lsi, loc, w, vi = make_inputs(Lq=0, B=2, N=3)
    out, grads, _ = run_with_grads(fn, value, ss, lsi, loc, w, vi)
    assert out.shape == (3, 0, 2 * 3)
    assert grads[0].abs().max() == 0
    # an empty level between two others: contributes zero, the others are unaffected
    value, ss, lsi, loc, w, _ = make_inputs(shapes=((4, 5), (0, 3), (2, 2)), seed=6)
    out, grads, go = run_with_grads(fn, value, ss, lsi, loc, w, None)
    keep = [0, 2]
    sub = (value, ss[keep], lsi[keep], loc[:, :, :, keep].contiguous(), w[:, :, :, keep].contiguous(), None)
    sub_out, sub_grads, _ = run_with_grads(pytorch_impl, *sub, go)
    torch.testing.assert_close(out, sub_out)
    torch.testing.assert_close(grads[1][:, :, :, keep], sub_grads[1])
    assert grads[1][:, :, :, 1].abs().max() == 0 and grads[2][:, :, :, 1].abs().max() == 0
    # only empty levels
    value, ss, lsi, loc, w, _ = make_inputs(shapes=((0, 4), (3, 0)), seed=7)
    out = fn(value, ss, lsi, loc, w, None)
    assert out.shape == (2, 5, 6) and out.abs().max() == 0


def test_pytorch_path_mixed_dtypes_returns_value_dtype():
    value, ss, lsi, loc, w, _ = make_inputs(dtype=torch.float32)
    out = ms_deform_attn_pytorch(value.bfloat16(), ss, lsi, loc, w)
    assert out.dtype == torch.bfloat16
    ref = ms_deform_attn_pytorch(value.bfloat16().float(), ss, lsi, loc, w)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def test_dispatch(monkeypatch):
    fake_cuda = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    cpu = torch.zeros(1)
    monkeypatch.setattr(ext_mod, "has_cuda_kernel", lambda: True)
    monkeypatch.setattr(ext_mod, "gpu_supported", lambda device: True)
    assert dispatch_mod.route(fake_cuda, "auto") == "kernel"
    monkeypatch.setattr(ext_mod, "compiled_module", lambda: object())
    assert dispatch_mod.route(cpu, "auto") == "kernel", "CPU tensors take soit._C when it is loaded"
    with force_pytorch():
        assert dispatch_mod.route(cpu, "auto") == "pytorch"
    monkeypatch.setattr(ext_mod, "compiled_module", lambda: None)
    assert dispatch_mod.route(cpu, "auto") == "pytorch", "without soit._C, CPU tensors take the PyTorch path"
    monkeypatch.undo()
    monkeypatch.setattr(ext_mod, "has_cuda_kernel", lambda: True)
    monkeypatch.setattr(ext_mod, "gpu_supported", lambda device: True)
    assert dispatch_mod.route(fake_cuda, "pytorch") == "pytorch"
    with force_pytorch():
        assert dispatch_mod.route(fake_cuda, "auto") == "pytorch"
        with force_pytorch(False):
            assert dispatch_mod.route(fake_cuda, "auto") == "kernel"
        assert dispatch_mod.route(fake_cuda, "auto") == "pytorch"
    assert dispatch_mod.route(fake_cuda, "auto") == "kernel"
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    assert dispatch_mod.route(fake_cuda, "auto") == "op", "tracing records soit::ms_deform_attn"
    assert dispatch_mod.route(cpu, "auto") == "op"
    with force_pytorch():
        assert dispatch_mod.route(fake_cuda, "auto") == "pytorch"
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert dispatch_mod.route(fake_cuda, "auto") == "pytorch", "ONNX graphs hold grid_sample"
    monkeypatch.undo()
    monkeypatch.setattr(ext_mod, "gpu_supported", lambda device: False)
    monkeypatch.setattr(ext_mod, "has_cuda_kernel", lambda: True)
    assert dispatch_mod.route(fake_cuda, "auto") == "pytorch", "a GPU the extension has no code for"
    monkeypatch.setattr(ext_mod, "has_cuda_kernel", lambda: False)
    monkeypatch.setattr(ext_mod, "gpu_supported", lambda device: True)
    assert dispatch_mod.route(fake_cuda, "auto") == "pytorch"
    with pytest.raises(ValueError, match="impl"):
        dispatch_mod.route(cpu, "fast")


def test_kernel_supports_device(monkeypatch):
    monkeypatch.setattr(ext_mod, "compiled_module", lambda: types.SimpleNamespace(cuda_arch_list=lambda: [80, 90]))
    monkeypatch.setattr(ext_mod, "_DEVICE_SUPPORTED", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "some GPU")
    for index, capability, expected in ((0, (8, 0), True), (1, (8, 6), True), (2, (10, 0), True), (3, (7, 5), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None, c=capability: c)
        if expected:
            assert ext_mod.gpu_supported(torch.device("cuda", index))
        else:
            with pytest.warns(RuntimeWarning, match="no code for"):
                assert not ext_mod.gpu_supported(torch.device("cuda", index))
            assert not ext_mod.gpu_supported(torch.device("cuda", index))  # cached, no second warning


def test_cpu_tensors_use_the_compiled_kernel_when_built(monkeypatch):
    calls = []
    original = pytorch_mod.ms_deform_attn_pytorch
    monkeypatch.setattr(pytorch_mod, "ms_deform_attn_pytorch", lambda *a: calls.append(1) or original(*a))
    value, ss, lsi, loc, w, _ = make_inputs()
    out = ms_deform_attn(value, ss, lsi, loc, w)
    assert bool(calls) == (not EXT_LOADED), "the PyTorch path runs exactly when soit._C is not loaded"
    calls.clear()
    with force_pytorch():
        ref = ms_deform_attn(value, ss, lsi, loc, w)
    assert calls, "force_pytorch() selects the PyTorch path on the CPU too"
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


class _LevelsToAttention(torch.nn.Module):
    """Feature maps in, attention out: the level sizes come from the maps' shapes, as in the
    model, so a traced graph must carry them through to the op."""

    def __init__(self, module):
        super().__init__()
        self.attn = module

    def forward(self, f0, f1, query, ref):
        ss, lsi = flatten_spatial_shapes([f0, f1])
        value = torch.cat([f0.flatten(2).transpose(1, 2), f1.flatten(2).transpose(1, 2)], 1)
        return self.attn(query, ref, value, ss, lsi)


def _levels_inputs(h, w, C=16, Lq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, C, h, w, generator=g),
        torch.randn(1, C, (h + 1) // 2, (w + 1) // 2, generator=g),
        torch.randn(1, Lq, C, generator=g),
        torch.rand(1, Lq, 2, 2, generator=g),
    )


def _levels_model():
    torch.manual_seed(0)
    module = MSDeformAttn(embed_dim=16, num_heads=2, num_levels=2, num_points=2)
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.5)
    return _LevelsToAttention(module).eval()


def test_trace_records_the_registered_op_and_runs_at_other_sizes(tmp_path):
    model = _levels_model()
    traced = torch.jit.trace(model, _levels_inputs(6, 8), check_trace=False)
    graph = str(traced.inlined_graph)
    assert "soit::ms_deform_attn" in graph and "grid_sampler" not in graph
    path = str(tmp_path / "attn.pt")
    torch.jit.save(traced, path)
    loaded = torch.jit.load(path)
    for h, w in ((6, 8), (9, 5), (13, 17)):
        args = _levels_inputs(h, w, seed=h)
        torch.testing.assert_close(loaded(*args), model(*args), rtol=1e-5, atol=1e-6)


def test_trace_under_force_pytorch_records_grid_sample_with_dynamic_levels():
    model = _levels_model()
    with force_pytorch():
        traced = torch.jit.trace(model, _levels_inputs(6, 8), check_trace=False)
    graph = str(traced.inlined_graph)
    assert "grid_sampler" in graph and "soit::ms_deform_attn" not in graph
    args = _levels_inputs(11, 7, seed=1)
    torch.testing.assert_close(traced(*args), model(*args), rtol=1e-5, atol=1e-6)


def test_onnx_export_uses_grid_sample_and_runs_at_other_sizes(tmp_path):
    import onnx  # installed by scripts/setup.sh: a missing one fails here
    import onnxruntime as ort

    model = _levels_model()
    path = str(tmp_path / "attn.onnx")
    names = ["f0", "f1", "query", "ref"]
    torch.onnx.export(
        model,
        _levels_inputs(6, 8),
        path,
        dynamo=False,
        opset_version=17,
        input_names=names,
        output_names=["out"],
        dynamic_axes={"f0": [2, 3], "f1": [2, 3]},
    )
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert "GridSample" in ops
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for h, w in ((6, 8), (10, 13)):
        args = _levels_inputs(h, w, seed=h)
        (out,) = session.run(None, {n: t.numpy() for n, t in zip(names, args)})
        torch.testing.assert_close(torch.from_numpy(out), model(*args).detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_registered_op_gradients_and_opcheck(shared):
    value, ss, lsi, loc, w, vi = make_inputs(B=2 if shared else None, N=3)
    op = torch.ops.soit.ms_deform_attn
    torch.library.opcheck(op, (value, ss, lsi, loc, w, vi))
    fn = lambda v, lo, wt: op(v, ss, lsi, lo, wt, vi)  # noqa: E731
    inputs = [t.clone().requires_grad_() for t in (value, loc, w)]
    assert torch.autograd.gradcheck(fn, inputs)
    torch.testing.assert_close(fn(*inputs), ms_deform_attn(value, ss, lsi, loc, w, value_index=vi, impl="pytorch"))


def test_registered_op_under_torch_compile():
    value, ss, lsi, loc, w, _ = make_inputs(dtype=torch.float32)
    value, loc, w = (t.float() for t in (value, loc, w))
    fn = lambda v, lo, wt: ms_deform_attn(v, ss, lsi, lo, wt).square().sum()  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    inputs = [t.clone().requires_grad_() for t in (value, loc, w)]
    ref = [t.clone().requires_grad_() for t in (value, loc, w)]
    out, expected = compiled(*inputs), fn(*ref)
    torch.testing.assert_close(out, expected)
    out.backward()
    expected.backward()
    for a, b in zip(inputs, ref):
        torch.testing.assert_close(a.grad, b.grad)


def _counting_extension(ext, calls):
    return types.SimpleNamespace(
        ms_deform_attn_forward=lambda *a: calls.append("forward") or ext.ms_deform_attn_forward(*a),
        ms_deform_attn_backward=lambda *a: calls.append("backward") or ext.ms_deform_attn_backward(*a),
        with_cuda=ext.with_cuda,
        cuda_arch_list=ext.cuda_arch_list,
    )


@needs_ext
def test_traced_attention_on_the_cpu_calls_the_compiled_op(monkeypatch):
    """A graph traced on the CPU records soit::ms_deform_attn, whose CPU implementation (forward
    and backward) is soit._C when it is loaded, at sizes other than the traced one too."""
    model = _levels_model()
    calls = []
    counting = _counting_extension(ext_mod.compiled_module(), calls)
    monkeypatch.setattr(ext_mod, "compiled_module", lambda: counting)
    traced = torch.jit.trace(model, _levels_inputs(6, 8), check_trace=False)
    assert "soit::ms_deform_attn" in str(traced.inlined_graph)
    calls.clear()
    args = [t.requires_grad_() for t in _levels_inputs(12, 9, seed=3)]
    out = traced(*args)
    out.square().sum().backward()
    assert calls == ["forward", "backward"], calls
    with force_pytorch():
        ref = model(*args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@needs_gpu
def test_traced_attention_on_cuda_calls_our_kernel(monkeypatch):
    model = _levels_model().cuda()
    calls = []
    ext = ext_mod.compiled_module()
    counting = types.SimpleNamespace(
        ms_deform_attn_forward=lambda *a: calls.append(1) or ext.ms_deform_attn_forward(*a),
        ms_deform_attn_backward=ext.ms_deform_attn_backward,
        with_cuda=ext.with_cuda,
        cuda_arch_list=ext.cuda_arch_list,
    )
    monkeypatch.setattr(ext_mod, "compiled_module", lambda: counting)
    traced = torch.jit.trace(model, [t.cuda() for t in _levels_inputs(6, 8)], check_trace=False)
    assert "soit::ms_deform_attn" in str(traced.inlined_graph)
    calls.clear()
    args = [t.cuda() for t in _levels_inputs(12, 9, seed=3)]
    out = traced(*args)
    assert calls, "the traced op ran our CUDA kernel"
    with force_pytorch():
        ref = model(*args)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the module
# ---------------------------------------------------------------------------------------------


def _module_inputs(N=2, Lq=6, C=32, num_levels=3, boxes=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 10), (4, 5), (2, 3), (1, 2)][:num_levels]
    ss = torch.tensor(shapes)
    areas = ss[:, 0] * ss[:, 1]
    lsi = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    query = torch.randn(N, Lq, C, generator=g)
    value = torch.randn(N, int(areas.sum()), C, generator=g)
    ref = torch.rand(N, Lq, num_levels, 4 if boxes else 2, generator=g)
    return query, ref, value, ss, lsi


@pytest.mark.parametrize("boxes", [False, True])
def test_module_forward_backward(boxes):
    torch.manual_seed(0)
    module = MSDeformAttn(embed_dim=32, num_heads=4, num_levels=3, num_points=2)
    # non-trivial offsets and weights
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(module.attention_weights.weight, std=0.1)
    query, ref, value, ss, lsi = _module_inputs(boxes=boxes)
    out = module(query, ref, value, ss, lsi)
    assert out.shape == query.shape
    out.square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_module_padding_mask_hides_padded_values():
    torch.manual_seed(0)
    module = MSDeformAttn(embed_dim=32, num_heads=4, num_levels=3, num_points=2)
    query, ref, value, ss, lsi = _module_inputs()
    mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    mask[0, 10:40] = True
    out = module(query, ref, value, ss, lsi, value_padding_mask=mask)
    changed = value.clone()
    changed[mask] = 1e3
    out2 = module(query, ref, changed, ss, lsi, value_padding_mask=mask)
    torch.testing.assert_close(out, out2)
    assert not torch.allclose(module(query, ref, changed, ss, lsi), out)


def test_module_rejects_bad_reference_points():
    module = MSDeformAttn(embed_dim=32, num_heads=4, num_levels=3, num_points=2)
    query, ref, value, ss, lsi = _module_inputs()
    with pytest.raises(ValueError, match="reference_points"):
        module(query, torch.rand(*ref.shape[:-1], 3), value, ss, lsi)


# ---------------------------------------------------------------------------------------------
# the compiled extension
# ---------------------------------------------------------------------------------------------


def _nvcc_present():
    """The same test setup.py makes to decide on a CUDA build."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return True
    return os.path.isfile("/usr/local/cuda/bin/nvcc") or shutil.which("nvcc") is not None


@pytest.mark.skipif(NO_EXT, reason="SOIT_NO_EXT=1: the compiled extension is ignored")
def test_extension_is_built():
    """CI installs the package (which builds soit._C): fail loudly when the build produced nothing
    or built without CUDA although a CUDA compiler is there."""
    try:
        ext = importlib.import_module("soit._C")
    except ImportError as e:
        pytest.fail(f"soit._C is missing ({e}); build it with `pip install -e . --no-build-isolation`")
    assert extension_status().startswith("loaded"), extension_status()
    if _nvcc_present() and os.environ.get("SOIT_FORCE_CUDA") != "0":
        assert ext.with_cuda(), "nvcc is present but soit._C was built without CUDA"
        assert 90 in ext.cuda_arch_list(), f"no Hopper (sm_90) code in soit._C: {ext.cuda_arch_list()}"
        assert ext.cuda_version() >= 11000
        assert has_cuda_kernel()
    else:
        assert ext.with_cuda() == has_cuda_kernel()


CPU_KERNEL_CASES = [
    # (D, P, shapes): D covers every vector width and lane count, and several chunks per lane
    (1, 2, ((4, 5), (3, 2), (1, 3))),
    (2, 4, ((6, 7),)),
    (3, 2, ((4, 5), (3, 2), (1, 3))),
    (4, 2, ((4, 5), (3, 2))),
    (8, 3, ((5, 4), (2, 2))),
    (40, 2, ((4, 5), (3, 2), (1, 3))),
    (200, 1, ((3, 3), (2, 1))),
]


@needs_ext
@pytest.mark.parametrize("D,P,shapes", CPU_KERNEL_CASES)
@pytest.mark.parametrize("shared", [False, True])
def test_cpu_kernel_matches_pytorch_float64(D, P, shapes, shared):
    inputs = make_inputs(N=3, Lq=4, M=2, D=D, P=P, shapes=shapes, B=2 if shared else None, seed=D)
    compare(kernel_impl, inputs, rtol=1e-10, atol_rel=1e-12)


@needs_ext
@pytest.mark.parametrize("shared", [False, True])
def test_gradcheck_cpu_kernel(shared):
    value, ss, lsi, loc, w, vi = make_inputs(N=3, Lq=3, M=2, D=5, P=2, B=2 if shared else None, seed=21)
    assert ((loc < 0) | (loc > 1)).any(), "some locations must be outside [0, 1]"
    inputs = tuple(t.requires_grad_() for t in (value, loc, w))
    fn = lambda v, lo, wt: kernel_impl(v, ss, lsi, lo, wt, vi)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("shared", [False, True])
def test_cpu_kernel_does_not_depend_on_the_thread_count(shared):
    """Forward and the three gradients bit for bit equal on 1 and 2 threads (the backward's
    work is split by value map and head, each summed in a fixed order). Big enough that the
    forward's split over queries uses both threads."""
    inputs = make_inputs(
        N=2, Lq=300, M=4, D=32, P=4, shapes=((20, 24), (10, 12), (5, 6)), dtype=torch.float32,
        B=1 if shared else None, seed=22,
    )
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, grads, _ = run_with_grads(kernel_impl, *inputs)
            results.append((out, *grads))
    finally:
        torch.set_num_threads(previous)
    for name, a, b in zip(("output", "grad value", "grad locations", "grad weights"), *results):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"


@needs_ext
@pytest.mark.parametrize("D", [8, 32, 2])  # 32 and 2: the widths compiled with a fixed channel count
@pytest.mark.parametrize("shared", [False, True])
def test_cpu_kernel_float32(D, shared):
    inputs = make_inputs(N=2, Lq=9, M=4, D=D, P=4, dtype=torch.float32, B=1 if shared else None, seed=11)
    compare(kernel_impl, inputs, rtol=1e-5, atol_rel=1e-5)


# Reduced-precision tolerance. The kernels accumulate in float32 (relative error ~1e-6 of the sum
# of |terms|) and round each result once to the output dtype: at most half a unit in the last
# place, 2^-11 = 4.9e-4 (float16) or 2^-8 = 3.9e-3 (bfloat16) of the value. We allow twice that
# relatively, plus 1e-3 of the largest |value| absolutely for elements that are small after
# cancellation (their float32 accumulation error is about 1e-6 of that scale, their rounding
# smaller still). Gradients kept in float32 (locations / weights read in float32) carry only the
# accumulation error: 1e-4 relative plus 1e-5 of the largest |value|.
LOW_PRECISION = {torch.float16: 2 * 2.0**-11, torch.bfloat16: 2 * 2.0**-8}


def low_precision_inputs(dtype, coord_dtype, device, **kw):
    """Inputs rounded to `dtype` (value) and `coord_dtype` (locations, weights); the reference
    then runs in float64 on exactly these numbers."""
    value, ss, lsi, loc, w, vi = make_inputs(dtype=torch.float64, device=device, **kw)
    return value.to(dtype), ss, lsi, loc.to(coord_dtype), w.to(coord_dtype), vi


def check_low_precision(impl, dtype, coord_dtype, device, **kw):
    inputs = low_precision_inputs(dtype, coord_dtype, device, **kw)
    tol = LOW_PRECISION[dtype]
    if coord_dtype == torch.float32:
        # value gradient rounded to dtype; location / weight gradients in float32
        out, grads, ref_out, ref_grads = run_and_reference(impl, inputs)
        assert out.dtype == dtype
        assert_scaled_close(out, ref_out, tol, 1e-3, "output")
        assert grads[0].dtype == dtype and grads[1].dtype == grads[2].dtype == torch.float32
        assert_scaled_close(grads[0], ref_grads[0], tol, 1e-3, "grad value")
        assert_scaled_close(grads[1], ref_grads[1], 1e-4, 1e-5, "grad locations")
        assert_scaled_close(grads[2], ref_grads[2], 1e-4, 1e-5, "grad weights")
    else:
        compare(impl, inputs, rtol=tol, atol_rel=1e-3)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("coord_is_float32", [True, False])
def test_cpu_kernel_low_precision(dtype, coord_is_float32):
    coord = torch.float32 if coord_is_float32 else dtype
    check_low_precision(kernel_impl, dtype, coord, "cpu", N=2, Lq=6, M=2, D=8, P=2, B=1, seed=12)


@needs_ext
def test_cpu_kernel_edge_cases():
    # zero queries, with and without shared maps
    for B in (None, 2):
        value, ss, lsi, loc, w, vi = make_inputs(Lq=0, N=2, B=B)
        out, grads, _ = run_with_grads(kernel_impl, value, ss, lsi, loc, w, vi)
        assert out.shape == (2, 0, 6) and grads[0].abs().max() == 0
    # empty levels, far out of range, a value pointer only 8-byte aligned (narrower vectors)
    compare(kernel_impl, make_inputs(shapes=((4, 5), (0, 3), (2, 0), (2, 2)), seed=13), rtol=1e-10, atol_rel=1e-12)
    compare(kernel_impl, make_inputs(spread=(-5.0, 6.0), seed=14), rtol=1e-10, atol_rel=1e-12)
    value, ss, lsi, loc, w, vi = make_inputs(D=4, dtype=torch.float32, seed=15)
    shifted = torch.empty(value.numel() + 2, dtype=value.dtype)[2:].view(value.shape)
    shifted.copy_(value)
    assert shifted.data_ptr() % 16 != 0
    compare(kernel_impl, (shifted, ss, lsi, loc, w, vi), rtol=1e-5, atol_rel=1e-5)
    # non-contiguous inputs are made contiguous
    value, ss, lsi, loc, w, vi = make_inputs(seed=16)
    loc_t = loc.transpose(0, 1).contiguous().transpose(0, 1)
    assert not loc_t.is_contiguous()
    compare(kernel_impl, (value, ss, lsi, loc_t, w, vi), rtol=1e-10, atol_rel=1e-12)


@needs_ext
def test_extension_input_checks():
    from soit import _C

    value, ss, lsi, loc, w, _ = make_inputs(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        _C.ms_deform_attn_forward(value.transpose(0, 1).contiguous().transpose(0, 1), ss, lsi, loc, w)
    with pytest.raises(RuntimeError, match="same dtype"):
        _C.ms_deform_attn_forward(value, ss, lsi, loc, w.double())
    with pytest.raises(RuntimeError, match="value's dtype"):
        _C.ms_deform_attn_forward(value, ss, lsi, loc.double(), w.double())
    with pytest.raises(RuntimeError, match="value_index"):
        _C.ms_deform_attn_forward(value[:1], ss, lsi, loc, w)
    with pytest.raises(RuntimeError, match="value_index out of range"):
        _C.ms_deform_attn_forward(value, ss, lsi, loc, w, torch.tensor([0, 5]))
    with pytest.raises(RuntimeError, match="spatial_shapes"):
        _C.ms_deform_attn_forward(value, ss[:2], lsi[:2], loc, w)
    with pytest.raises(RuntimeError, match="does not fit"):
        _C.ms_deform_attn_forward(value, ss * 2, lsi, loc, w)
    with pytest.raises(RuntimeError, match="grad_output"):
        _C.ms_deform_attn_backward(value, ss, lsi, loc, w, None, torch.zeros(2, 5, 5))
    if not _C.with_cuda():
        assert "without CUDA" in extension_status()


@needs_ext
def test_kernel_path_autograd_details():
    # gradients only for what requires them; value's dtype decides the output's
    value, ss, lsi, loc, w, _ = make_inputs(dtype=torch.float32)
    value.requires_grad_()
    out = ms_deform_attn(value, ss, lsi, loc, w, impl="kernel")
    out.sum().backward()
    assert value.grad is not None and loc.grad is None
    # float16 value with float64 locations: locations are read in float32, gradients come back
    # in the inputs' dtypes
    v16 = value.detach().half().requires_grad_()
    loc64 = loc.double().requires_grad_()
    out = ms_deform_attn(v16, ss, lsi, loc64, w, impl="kernel")
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert v16.grad.dtype == torch.float16 and loc64.grad.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# without the extension
# ---------------------------------------------------------------------------------------------

_NO_EXT_SCRIPT = textwrap.dedent(
    """
    import sys
    {prelude}
    import torch
    from soit.layers.ms_deform_attn import MSDeformAttn, extension_status, has_cuda_kernel, ms_deform_attn
    assert not has_cuda_kernel()
    print("status:", extension_status())
    torch.manual_seed(0)
    m = MSDeformAttn(embed_dim=16, num_heads=2, num_levels=2, num_points=2)
    ss = torch.tensor([[6, 5], [3, 3]]); lsi = torch.tensor([0, 30])
    q = torch.randn(2, 7, 16); v = torch.randn(2, 39, 16, requires_grad=True)
    out = m(q, torch.rand(2, 7, 2, 2), v, ss, lsi)
    out.sum().backward()
    assert out.shape == (2, 7, 16) and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0
    try:
        ms_deform_attn(v, ss, lsi, torch.rand(2, 7, 2, 2, 2, 2), torch.rand(2, 7, 2, 2, 2), impl="kernel")
    except RuntimeError as e:
        print("kernel:", e)
    assert "soit._C" not in sys.modules or {allow_loaded}
    print("ok")
    """
)

# makes `import soit._C` fail as if the extension had never been built
_BLOCK_EXT = textwrap.dedent(
    """
    import importlib.abc
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "soit._C":
                raise ModuleNotFoundError("No module named 'soit._C'", name="soit._C")
    sys.meta_path.insert(0, _Block())
    """
)


@pytest.mark.parametrize("how", ["SOIT_NO_EXT", "absent"])
def test_package_works_without_extension(how):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    if how == "SOIT_NO_EXT":
        env["SOIT_NO_EXT"] = "1"
        script = _NO_EXT_SCRIPT.format(prelude="", allow_loaded="False")
    else:
        env.pop("SOIT_NO_EXT", None)
        script = _NO_EXT_SCRIPT.format(prelude=_BLOCK_EXT, allow_loaded="False")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok" in res.stdout
    expected = "disabled (SOIT_NO_EXT=1)" if how == "SOIT_NO_EXT" else "not built"
    assert f"status: {expected}" in res.stdout
    assert "kernel: ms_deform_attn(impl='kernel'): soit._C is" in res.stdout


# ---------------------------------------------------------------------------------------------
# the CUDA kernels (GPU machines only)
# ---------------------------------------------------------------------------------------------

GPU_CASES = {
    # SOIT's shapes, scaled down: encoder (4 levels, 8 heads x 32 channels, 4 points), mask head
    # (1 level, 4 heads x 2 channels, 4 points, shared maps), then widths and lane counts that
    # the SOIT shapes do not reach, a head too wide for one pass, and many samples per query
    # (several staging tiles).
    "encoder": dict(N=2, Lq=300, M=8, D=32, P=4, shapes=((20, 34), (10, 17), (5, 9), (3, 5))),
    "mask_head": dict(N=10, Lq=400, M=4, D=2, P=4, shapes=((20, 20),), B=2),
    "odd_channels": dict(N=2, Lq=50, M=3, D=3, P=2, shapes=((7, 9), (4, 5))),
    "d6": dict(N=2, Lq=50, M=2, D=6, P=3, shapes=((7, 9), (4, 5))),
    "wide_head": dict(N=2, Lq=20, M=1, D=200, P=2, shapes=((7, 9), (4, 5))),
    "many_points": dict(N=2, Lq=70, M=2, D=2, P=16, shapes=((7, 9), (4, 5), (3, 3), (2, 2))),
}


@needs_gpu
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_cuda_kernel_float32(case):
    inputs = make_inputs(device="cuda", dtype=torch.float32, **GPU_CASES[case], seed=21)
    compare(kernel_impl, inputs, rtol=1e-5, atol_rel=1e-5)
    # and against the float32 PyTorch path itself
    out, grads, go = run_with_grads(kernel_impl, *inputs)
    ref_out, ref_grads, _ = run_with_grads(pytorch_impl, *inputs, go)
    assert_scaled_close(out, ref_out, 1e-5, 1e-5, "output vs float32 PyTorch")
    for g, rg in zip(grads, ref_grads):
        assert_scaled_close(g, rg, 1e-5, 1e-5, "grad vs float32 PyTorch")


@needs_gpu
@pytest.mark.parametrize("case", ["encoder", "mask_head", "d6", "odd_channels"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("coord_is_float32", [True, False])
def test_cuda_kernel_low_precision(case, dtype, coord_is_float32):
    coord = torch.float32 if coord_is_float32 else dtype
    check_low_precision(kernel_impl, dtype, coord, "cuda", **GPU_CASES[case], seed=22)


@needs_gpu
def test_cuda_kernel_float64():
    compare(kernel_impl, make_inputs(device="cuda", **GPU_CASES["odd_channels"], seed=23), rtol=1e-10, atol_rel=1e-12)


@needs_gpu
def test_cuda_kernel_edge_cases():
    dev = "cuda"
    # shared value maps, against copies
    value, ss, lsi, loc, w, vi = make_inputs(device=dev, dtype=torch.float32, **GPU_CASES["mask_head"], seed=24)
    out, grads, go = run_with_grads(kernel_impl, value, ss, lsi, loc, w, vi)
    c_out, c_grads, _ = run_with_grads(
        lambda vv, *a: ms_deform_attn(vv[vi], *a[:4], impl="kernel"), value, ss, lsi, loc, w, None, go
    )
    assert_scaled_close(out, c_out, 1e-6, 1e-6, "shared vs copied output")
    for g, cg in zip(grads, c_grads):
        assert_scaled_close(g, cg, 1e-5, 1e-5, "shared vs copied grads")
    # zero queries, zero groups
    for kw in (dict(Lq=0), dict(N=0, B=2)):
        value, ss, lsi, loc, w, vi = make_inputs(device=dev, dtype=torch.float32, **kw)
        out, grads, _ = run_with_grads(kernel_impl, value, ss, lsi, loc, w, vi)
        assert out.numel() == 0 and grads[0].abs().sum() == 0
    # empty levels, far out of range
    for kw in (dict(shapes=((4, 5), (0, 3), (2, 0), (2, 2))), dict(spread=(-5.0, 6.0)), dict(spread=(1.5, 3.0))):
        compare(kernel_impl, make_inputs(device=dev, dtype=torch.float32, seed=25, **kw), rtol=1e-5, atol_rel=1e-5)
    # value only 8-byte aligned: narrower vector accesses
    value, ss, lsi, loc, w, vi = make_inputs(device=dev, dtype=torch.float32, D=4, seed=26)
    shifted = torch.empty(value.numel() + 2, device=dev)[2:].view(value.shape)
    shifted.copy_(value)
    compare(kernel_impl, (shifted, ss, lsi, loc, w, vi), rtol=1e-5, atol_rel=1e-5)
    # spatial_shapes on the CPU with CUDA values
    value, ss, lsi, loc, w, vi = make_inputs(device=dev, dtype=torch.float32, seed=27)
    compare(kernel_impl, (value, ss.cpu(), lsi.cpu(), loc, w, vi), rtol=1e-5, atol_rel=1e-5)


@needs_gpu
def test_cuda_dispatch_and_module_under_autocast(monkeypatch):
    torch.manual_seed(0)
    module = MSDeformAttn(embed_dim=64, num_heads=8, num_levels=3, num_points=4).cuda()
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(module.attention_weights.weight, std=0.1)
    args = [t.cuda() for t in _module_inputs(C=64, Lq=50)]
    kernel_calls = []
    original = op_mod._MSDeformAttnFunction.apply
    monkeypatch.setattr(op_mod._MSDeformAttnFunction, "apply", lambda *a: kernel_calls.append(a) or original(*a))
    out = module(*args)
    assert kernel_calls, "CUDA tensors take the kernel by default"
    with force_pytorch():
        n = len(kernel_calls)
        ref = module(*args)
        assert len(kernel_calls) == n
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out16 = module(*args)
    # the op got the bfloat16 value and float32 locations / weights (see _MSDeformAttnFunction)
    value, _, _, loc, w, _ = kernel_calls[-1]
    assert value.dtype == torch.bfloat16 and loc.dtype == w.dtype == torch.float32
    # bfloat16 projections around the op: compare loosely with the float32 result
    torch.testing.assert_close(out16.float(), ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item())
    out16.float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
