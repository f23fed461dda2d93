"""The CUDA kernels of multi-scale deformable attention, run on the CPU.

cuda_emulation/emulate_msda.cpp compiles soit/layers/csrc/cuda/ms_deform_attn_kernels.cuh with
the host compiler and runs each block's threads as OS threads (barriers for __syncthreads and
the warp shuffles, real atomics, alignment checks, NaN-filled shared memory). That tests the
kernels' indexing, staging, tiling, lane split and reductions on machines without a GPU; the
GPU tests in test_ms_deform_attn.py then compare the compiled kernels themselves.
"""

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from soit.layers.ms_deform_attn import ms_deform_attn

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "cuda_emulation", "emulate_msda.cpp")
CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.fail("a C++ compiler (g++, c++ or clang++, or $CXX) is needed to check the CUDA kernels on the CPU")
    lib_path = tmp_path_factory.mktemp("emulate_msda") / "emulate_msda.so"
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-I", include, SOURCE, "-o", str(lib_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, "the kernels do not compile for emulation:\n" + res.stderr[-6000:]
    lib = ctypes.CDLL(str(lib_path))
    lib.emu_msda_forward.restype = ctypes.c_char_p
    lib.emu_msda_backward.restype = ctypes.c_char_p
    lib.emu_msda_config.restype = None
    return lib


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _sizes(value, loc):
    B, S, M, D = value.shape
    N, Lq, _, L, P, _ = loc.shape
    return [ctypes.c_int64(x) for x in (B, S, M, D, N, Lq, L, P)]


def emu_forward(lib, value, ss, lsi, loc, w, vi):
    N, Lq, M = loc.shape[:3]
    out = torch.full((N, Lq, M * value.shape[3]), float("nan"), dtype=value.dtype)  # every element must be written
    err = lib.emu_msda_forward(
        CODES[value.dtype], CODES[loc.dtype], _ptr(value), _ptr(ss), _ptr(lsi), _ptr(loc), _ptr(w), _ptr(vi),
        _ptr(out), *_sizes(value, loc)
    )  # fmt: skip
    assert err is None, err.decode()
    return out


def emu_backward(lib, value, ss, lsi, loc, w, vi, grad_out):
    acc = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, dtype=acc)
    grad_loc = torch.full_like(loc, float("nan"))
    grad_w = torch.full_like(w, float("nan"))
    err = lib.emu_msda_backward(
        CODES[value.dtype], CODES[loc.dtype], _ptr(value), _ptr(ss), _ptr(lsi), _ptr(loc), _ptr(w), _ptr(vi),
        _ptr(grad_out), _ptr(grad_value), _ptr(grad_loc), _ptr(grad_w), *_sizes(value, loc)
    )  # fmt: skip
    assert err is None, err.decode()
    return grad_value.to(value.dtype), grad_loc, grad_w


def config(lib, D, L, P, num_items, elem_size, acc_size, copies, aligned_like):
    out = (ctypes.c_int64 * 6)()
    lib.emu_msda_config(D, L, P, num_items, elem_size, acc_size, copies, _ptr(aligned_like), out)
    return dict(zip(("vec", "group", "items_per_block", "tile", "smem", "blocks"), list(out)))


def make_inputs(N, Lq, M, D, shapes, P, B=None, spread=(-0.3, 1.3), seed=0):
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes, dtype=torch.long).view(-1, 2)
    areas = ss[:, 0] * ss[:, 1]
    lsi = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), ss.shape[0]
    value = torch.randn(N if B is None else B, S, M, D, generator=g, dtype=torch.float64)
    lo, hi = spread
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo
    w = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64)
    vi = None if B is None else torch.randint(0, B, (N,), generator=g)
    grad_out = torch.randn(N, Lq, M * D, generator=g, dtype=torch.float64)
    return value, ss, lsi, loc, w, vi, grad_out


def reference(value, ss, lsi, loc, w, vi, grad_out):
    value, loc, w = (t.to(torch.float64).requires_grad_() for t in (value, loc, w))
    out = ms_deform_attn(value, ss, lsi, loc, w, value_index=vi, impl="pytorch")
    grads = torch.autograd.grad(out, (value, loc, w), grad_out.to(torch.float64))
    return out.detach(), grads


def assert_scaled_close(actual, expected, rtol, atol_rel, what):
    actual, expected = actual.to(torch.float64), expected.to(torch.float64)
    assert torch.isfinite(actual).all(), f"{what}: NaN left (an element was not written) or non-finite"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol_rel * scale + 1e-300, msg=lambda m: f"{what}: {m}"
    )


# (value dtype, coordinate dtype, D, M, P, shapes, items): D and the dtype pick the vector width
# and the lanes per item (1 .. 32, one or several channel chunks); items is roughly N * Lq * M.
CASES = {
    "f64_d1": (torch.float64, torch.float64, 1, 2, 2, ((4, 5), (3, 2), (1, 3)), 300),
    "f64_d3": (torch.float64, torch.float64, 3, 2, 2, ((4, 5), (3, 2), (1, 3)), 150),
    "f64_d40_group32": (torch.float64, torch.float64, 40, 1, 2, ((4, 5), (3, 2)), 12),
    "f32_encoder": (torch.float32, torch.float32, 32, 8, 4, ((6, 7), (3, 4), (2, 2), (1, 1)), 80),
    "f32_mask_head": (torch.float32, torch.float32, 2, 4, 4, ((9, 8),), 600),
    "f32_d12_idle_lanes": (torch.float32, torch.float32, 12, 2, 3, ((5, 4), (2, 3)), 120),
    "f32_d3": (torch.float32, torch.float32, 3, 3, 2, ((5, 4), (2, 3)), 150),
    "f32_d64_group16": (torch.float32, torch.float32, 64, 3, 2, ((4, 4), (2, 3)), 27),
    "f32_d32_three_heads": (torch.float32, torch.float32, 32, 3, 4, ((6, 7), (3, 4), (2, 2)), 100),
    "f32_d200_chunks": (torch.float32, torch.float32, 200, 1, 2, ((4, 4), (2, 3)), 12),
    "f32_many_points_tiles": (torch.float32, torch.float32, 2, 2, 16, ((6, 7), (3, 4), (2, 2), (1, 3)), 300),
    "bf16_encoder": (torch.bfloat16, torch.float32, 32, 4, 4, ((6, 7), (3, 4), (2, 2)), 100),
    "bf16_all16": (torch.bfloat16, torch.bfloat16, 16, 2, 2, ((5, 6), (2, 2)), 100),
    "f16_d6": (torch.float16, torch.float32, 6, 2, 3, ((5, 6), (2, 2)), 100),
    "f16_mask_head_all16": (torch.float16, torch.float16, 2, 4, 4, ((9, 8),), 300),
}


def _tolerance(dtype, coord):
    if dtype == torch.float64:
        return 1e-10, 1e-12, 1e-10, 1e-12
    if dtype == torch.float32:
        return 1e-5, 1e-5, 1e-5, 1e-5
    # one rounding to the 16-bit type after float32 accumulation (see test_ms_deform_attn.py)
    tol = 2 * (2.0**-11 if dtype == torch.float16 else 2.0**-8)
    return (tol, 1e-3) + ((1e-4, 1e-5) if coord == torch.float32 else (tol, 1e-3))


def _check(emu, inputs, dtype, coord, location_grads=True):
    value, ss, lsi, loc, w, vi, grad_out = inputs
    value, loc, w, grad_out = value.to(dtype), loc.to(coord), w.to(coord), grad_out.to(dtype)
    out = emu_forward(emu, value, ss, lsi, loc, w, vi)
    grads = emu_backward(emu, value, ss, lsi, loc, w, vi, grad_out)
    ref_out, ref_grads = reference(value, ss, lsi, loc, w, vi, grad_out)
    rtol, atol, grtol, gatol = _tolerance(dtype, coord)
    assert_scaled_close(out, ref_out, rtol, atol, "output")
    assert_scaled_close(grads[0], ref_grads[0], rtol, atol, "grad value")
    if location_grads:
        assert_scaled_close(grads[1], ref_grads[1], grtol, gatol, "grad locations")
    assert_scaled_close(grads[2], ref_grads[2], grtol, gatol, "grad weights")


def case_dims(name):
    """(N, Lq, B) of a case: shared value maps (value_index) in every other case."""
    dtype, coord, D, M, P, shapes, items = CASES[name]
    shared = sorted(CASES).index(name) % 2 == 1
    N = 3 if shared else 2
    return N, max(1, items // (N * M)), 2 if shared else None


@pytest.mark.parametrize("name", sorted(CASES))
def test_emulated_kernels_match_pytorch(emu, name):
    dtype, coord, D, M, P, shapes, items = CASES[name]
    N, Lq, B = case_dims(name)
    _check(emu, make_inputs(N=N, Lq=Lq, M=M, D=D, shapes=shapes, P=P, B=B, seed=len(name)), dtype, coord)


def test_emulated_kernels_cover_the_launch_shapes(emu):
    """The cases above reach every vector width, lane count from 1 to 32, several chunks per lane,
    a partial last block whose last warp is partly idle, and several staging tiles."""
    seen = set()
    for name, (dtype, coord, D, M, P, shapes, items) in CASES.items():
        N, Lq, _ = case_dims(name)
        num_items = N * Lq * M
        acc = 8 if dtype == torch.float64 else 4
        for copies in (1, 2):
            c = config(emu, D, len(shapes), P, num_items, dtype.itemsize, acc, copies, torch.empty(8))
            seen.add(("vec", c["vec"]))
            seen.add(("group", c["group"]))
            if D > c["vec"] * c["group"]:
                seen.add("chunks")
            if c["tile"] < len(shapes) * P:
                seen.add(("tiles", copies))
            last = num_items % c["items_per_block"]
            if last:
                seen.add("partial block")
                if (last * c["group"]) % 32 and c["group"] > 1:
                    seen.add("partial warp")
    expected = {("vec", v) for v in (1, 2, 4, 8)} | {("group", g) for g in (1, 2, 4, 8, 16, 32)}
    expected |= {"chunks", ("tiles", 1), ("tiles", 2), "partial block", "partial warp"}
    assert expected <= seen, expected - seen


def test_emulated_edge_cases(emu):
    # empty levels, everything far outside, locations exactly on pixel centres and edges
    _check(emu, make_inputs(N=2, Lq=20, M=2, D=4, shapes=((4, 5), (0, 3), (3, 0), (2, 2)), P=2), torch.float32,
           torch.float32)  # fmt: skip
    _check(emu, make_inputs(N=2, Lq=20, M=2, D=4, shapes=((4, 5), (2, 2)), P=2, spread=(-4.0, 5.0)), torch.float32,
           torch.float32)  # fmt: skip
    value, ss, lsi, loc, w, vi, go = make_inputs(N=1, Lq=30, M=1, D=2, shapes=((4, 4),), P=1, B=1)
    loc = (torch.randint(-1, 10, loc.shape) / 8).to(torch.float64)  # multiples of half a pixel
    # (the location gradient has a kink there: either one-sided derivative is right)
    _check(emu, (value, ss, lsi, loc, w, vi, go), torch.float64, torch.float64, location_grads=False)
    # a value pointer only 8-byte aligned: the launch picks narrower vectors, which must be aligned
    value, ss, lsi, loc, w, vi, go = make_inputs(N=2, Lq=20, M=2, D=8, shapes=((4, 5), (2, 2)), P=2)
    shifted = torch.empty(value.numel() + 2, dtype=torch.float32)[2:].view(value.shape)
    assert config(emu, 8, 2, 2, 80, 4, 4, 1, shifted)["vec"] == 2
    shifted.copy_(value)
    out = emu_forward(emu, shifted, ss, lsi, loc.float(), w.float(), vi)
    ref_out, _ = reference(shifted, ss, lsi, loc.float(), w.float(), vi, go)
    assert_scaled_close(out, ref_out, 1e-5, 1e-5, "misaligned output")


def test_emulator_reports_bad_value_index(emu):
    value, ss, lsi, loc, w, vi, go = make_inputs(N=2, Lq=4, M=1, D=2, shapes=((3, 3),), P=1, B=2)
    bad = torch.tensor([0, 2])
    with pytest.raises(AssertionError, match="device assertion failed"):
        emu_forward(emu, value, ss, lsi, loc, w, bad)
