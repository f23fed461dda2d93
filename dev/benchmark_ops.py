#!/usr/bin/env python
"""Benchmark multi-scale deformable attention at SOIT's shapes.

Shapes (batch 2 at 800 x 1333, four levels at strides 8..64: 100x167, 50x84, 25x42, 13x21):
    encoder    every token a query: 2 x 22,223 queries, 8 heads x 32 channels, 4 levels x 4 points
    decoder    300 queries per image, same heads / levels / points
    mask_head  100 instances over the stride-8 map of one image (one value map shared through
               value_index), every pixel a query, 4 heads x 2 channels, 1 level x 4 points
``--size reduced`` (the default on the CPU) halves the input side (400 x 667: 50x84 .. 7x11), uses
batch 1 and 25 instances, so that a CPU run takes a minute or two.

Implementations:
    kernel     soit._C (the CUDA kernels on a GPU; its CPU implementation on the CPU)
    pytorch    the grid_sample formulation (ms_deform_attn_pytorch)
    gather     the explicit-gather formulation (ms_deform_attn_pytorch_gather)
    original   the Deformable DETR CUDA op, when its ``MultiScaleDeformableAttention`` package is
               installed (float32 only; value maps copied per instance for the mask head)

Reported: median milliseconds of the forward and of forward + backward, and the effective
bandwidth: bytes that must move / time, where the forward must read value (each map once),
locations and weights and write the output, and the backward must read value, locations,
weights and the output gradient and write the three input gradients (all in their own dtypes).

Examples:
    python dev/benchmark_ops.py                              # CUDA when present, else CPU
    python dev/benchmark_ops.py --device cpu --threads 1,2
    python dev/benchmark_ops.py --device cuda --dtypes fp32,bf16 --markdown
"""

import argparse
import json
import os
import platform
import sys

import torch

from soit.layers.ms_deform_attn import (  # noqa: E402
    extension_status,
    has_cuda_kernel,
    ms_deform_attn,
    ms_deform_attn_pytorch_gather,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the other dev/ modules
from bench_timing import median_time  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
FULL_LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
REDUCED_LEVELS = [(50, 84), (25, 42), (13, 21), (7, 11)]


def shape_specs(size):
    levels = FULL_LEVELS if size == "full" else REDUCED_LEVELS
    batch = 2 if size == "full" else 1
    instances = 100 if size == "full" else 25
    tokens = sum(h * w for h, w in levels)
    return {
        "encoder": dict(N=batch, Lq=tokens, M=8, D=32, P=4, levels=levels, B=None),
        "decoder": dict(N=batch, Lq=300, M=8, D=32, P=4, levels=levels, B=None),
        "mask_head": dict(N=instances, Lq=levels[0][0] * levels[0][1], M=4, D=2, P=4, levels=levels[:1], B=1),
    }


def make_inputs(spec, dtype, coord_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(spec["levels"], dtype=torch.long)
    areas = ss[:, 0] * ss[:, 1]
    lsi = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(spec["levels"])
    N, Lq, M, D, P, B = (spec[k] for k in ("N", "Lq", "M", "D", "P", "B"))
    value = torch.randn(N if B is None else B, S, M, D, generator=g).to(device, dtype)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g).to(device, coord_dtype)
    weights = torch.rand(N, Lq, M, L, P, generator=g).to(device, coord_dtype)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    vi = None if B is None else torch.zeros(N, dtype=torch.long).to(device)
    return value, ss.to(device), lsi.to(device), loc, weights, vi


def bytes_moved(value, loc, w, backward):
    N, Lq, M = loc.shape[:3]
    out = N * Lq * M * value.shape[3] * value.element_size()
    inputs = value.numel() * value.element_size() + (loc.numel() + w.numel()) * loc.element_size()
    fwd = inputs + out
    # backward: read inputs + grad_out, write grads of the same sizes as the inputs
    return fwd + (2 * inputs + out if backward else 0)


def _original_op():
    try:
        import MultiScaleDeformableAttention as original  # the Deformable DETR package, if installed
    except ImportError:
        return None

    class Original(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, ss, lsi, loc, w):
            ctx.save_for_backward(value, ss, lsi, loc, w)
            return original.ms_deform_attn_forward(value, ss, lsi, loc, w, 64)

        @staticmethod
        def backward(ctx, grad):
            value, ss, lsi, loc, w = ctx.saved_tensors
            gv, gl, gw = original.ms_deform_attn_backward(value, ss, lsi, loc, w, grad.contiguous(), 64)
            return gv, None, None, gl, gw

    def run(value, ss, lsi, loc, w, vi):
        if vi is not None:
            value = value[vi]  # the original op has no shared value maps
        return Original.apply(value, ss, lsi, loc, w)

    return run


def implementations(device):
    impls = {
        "kernel": lambda v, ss, lsi, loc, w, vi: ms_deform_attn(v, ss, lsi, loc, w, value_index=vi, impl="kernel"),
        "pytorch": lambda v, ss, lsi, loc, w, vi: ms_deform_attn(v, ss, lsi, loc, w, value_index=vi, impl="pytorch"),
        "gather": lambda v, ss, lsi, loc, w, vi: ms_deform_attn_pytorch_gather(v, ss, lsi, loc, w, value_index=vi),
    }
    if device == "cuda":
        original = _original_op()
        if original is not None:
            impls["original"] = original
    return impls


def timer(device):
    """Median milliseconds of ``iters`` calls of a function after ``warmup`` calls."""
    return lambda fn, warmup, iters: 1e3 * median_time(fn, iters, warmup, device)[0]


def bench_one(impl, inputs, time_ms, warmup, iters, backward):
    value, ss, lsi, loc, w, vi = inputs
    if not backward:

        def fwd():
            with torch.no_grad():
                impl(value, ss, lsi, loc, w, vi)

        return time_ms(fwd, warmup, iters)
    v, lo, wt = (t.detach().requires_grad_() for t in (value, loc, w))
    grad = None

    def fwd_bwd():
        nonlocal grad
        out = impl(v, ss, lsi, lo, wt, vi)
        if grad is None:
            grad = torch.randn_like(out)
        torch.autograd.grad(out, (v, lo, wt), grad)

    return time_ms(fwd_bwd, warmup, iters)


def machine_info(device):
    info = {"torch": torch.__version__, "python": platform.python_version(), "soit._C": extension_status()}
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name()
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
            if names:
                cpu = names[0]
        except OSError:
            pass
        info["device"] = f"{cpu}, {os.cpu_count()} logical CPUs"
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--size", choices=["auto", "full", "reduced"], default="auto",
                        help="full SOIT sizes, or reduced (default on the CPU)")  # fmt: skip
    parser.add_argument("--shapes", default="encoder,decoder,mask_head")
    parser.add_argument("--dtypes", default=None, help="default: fp32,fp16,bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--coords", choices=["float32", "value", "both"], default="both",
                        help="dtype of locations / weights for fp16 / bf16 values")  # fmt: skip
    parser.add_argument("--impls", default=None, help="default: every one available on the device")
    parser.add_argument("--threads", default=None, help="CPU: comma-separated thread counts to compare")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    size = args.size if args.size != "auto" else ("full" if device == "cuda" else "reduced")
    dtypes = (args.dtypes or ("fp32,fp16,bf16" if device == "cuda" else "fp32")).split(",")
    warmup = args.warmup if args.warmup is not None else (10 if device == "cuda" else 1)
    iters = args.iters if args.iters is not None else (50 if device == "cuda" else 3)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    all_impls = implementations(device)
    names = args.impls.split(",") if args.impls else list(all_impls)
    if "kernel" in names and (
        extension_status().startswith(("not built", "disabled", "failed"))
        or (device == "cuda" and not has_cuda_kernel())
    ):
        print(f"# skipping 'kernel': soit._C is {extension_status()}")
        names.remove("kernel")
    specs = shape_specs(size)
    time_ms = timer(device)

    info = machine_info(device)
    print("# " + ", ".join(f"{k}: {v}" for k, v in info.items()))
    print(f"# size {size}, median of {iters} runs after {warmup} warm-up runs")
    rows = []
    header = ["shape", "dtype", "coords", "impl", "threads", "fwd ms", "fwd GB/s", "fwd+bwd ms", "fwd+bwd GB/s"]
    if not args.markdown:
        print("{:<10} {:<5} {:<7} {:<8} {:>7} {:>10} {:>9} {:>11} {:>13}".format(*header))
    for shape in args.shapes.split(","):
        spec = specs[shape]
        for dname in dtypes:
            dtype = DTYPES[dname]
            coord_options = [dtype]
            if dtype in (torch.float16, torch.bfloat16):
                coord_options = {"float32": [torch.float32], "value": [dtype], "both": [torch.float32, dtype]}[
                    args.coords
                ]
            for coord in coord_options:
                inputs = make_inputs(spec, dtype, coord, device)
                for name in names:
                    if name == "original" and dtype != torch.float32:
                        continue
                    for nt in threads if device == "cpu" else [None]:
                        if nt is not None:
                            torch.set_num_threads(nt)
                        fwd = bench_one(all_impls[name], inputs, time_ms, warmup, iters, backward=False)
                        both = bench_one(all_impls[name], inputs, time_ms, warmup, iters, backward=True)
                        value, _, _, loc, w, _ = inputs
                        row = dict(
                            shape=shape,
                            dtype=dname,
                            coords=str(coord).replace("torch.", "").replace("float", "fp"),
                            impl=name,
                            threads=nt if nt is not None else "-",
                            fwd_ms=fwd,
                            fwd_gbs=bytes_moved(value, loc, w, False) / fwd / 1e6,
                            fwd_bwd_ms=both,
                            fwd_bwd_gbs=bytes_moved(value, loc, w, True) / both / 1e6,
                        )
                        rows.append(row)
                        if not args.markdown:
                            print(
                                "{shape:<10} {dtype:<5} {coords:<7} {impl:<8} {threads:>7} {fwd_ms:>10.3f} "
                                "{fwd_gbs:>9.2f} {fwd_bwd_ms:>11.3f} {fwd_bwd_gbs:>13.2f}".format(**row),
                                flush=True,
                            )
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print(
                "| {shape} | {dtype} | {coords} | {impl} | {threads} | {fwd_ms:.3f} | {fwd_gbs:.2f} | "
                "{fwd_bwd_ms:.3f} | {fwd_bwd_gbs:.2f} |".format(**r)
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "size": size, "warmup": warmup, "iters": iters, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
