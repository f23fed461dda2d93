#!/usr/bin/env python
"""Parameters, FLOPs and activations of a SOIT LazyConfig model at a given input size.

    python tools/analyze_model.py --config-file configs/models/soit_r50.py \\
        --tasks parameter flop activation --input-size 800 1333

Parameters: per top-level module; the "checkpoint-equivalent" total adds the backbone's
FrozenBN weights and biases (buffers here, parameters in torchvision-style checkpoints such
as the official release's).

FLOPs (fused multiply-adds, fvcore's convention) and activations are counted on the graph
that export traces, for one image of --input-size (the network input, after any resizing),
with the multi-scale deformable attention counted by its own handle (soit/analysis.py);
operators that no handle counts are listed. Random weights are used: the counts do not
depend on them.
"""
import argparse
import os
import sys

from soit.config import add_trust_arguments


TASKS = ("parameter", "flop", "activation")


def count_parameters(model):
    from detectron2.layers import FrozenBatchNorm2d

    rows = {}
    for name, child in model.named_children():
        params = sum(p.numel() for p in child.parameters())
        frozen = sum(m.weight.numel() + m.bias.numel() for m in child.modules() if isinstance(m, FrozenBatchNorm2d))
        if params or frozen:
            rows[name] = (params, frozen)
    return rows


def print_parameters(model):
    rows = count_parameters(model)
    width = max(len(n) for n in rows)
    print(f"{'module':<{width}}  {'parameters':>12}  {'FrozenBN affine':>15}")
    for name, (params, frozen) in rows.items():
        print(f"{name:<{width}}  {params:>12,}  {frozen:>15,}")
    params = sum(p for p, _ in rows.values())
    frozen = sum(f for _, f in rows.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{'total':<{width}}  {params:>12,}  {frozen:>15,}")
    print(f"trainable parameters: {trainable:,}")
    print(f"checkpoint-equivalent parameters (parameters + FrozenBN affine): {params + frozen:,}")


def _by_module(analysis, model, unit):
    """Top-level modules of the model with their counts (the adapter adds a "model." prefix)."""
    counts = analysis.by_module()
    rows = [(name, counts.get(f"model.{name}", 0)) for name, _ in model.named_children()]
    return [(name, value / unit) for name, value in rows if value]


def print_counts(title, analysis, model, unit, unit_name):
    total = analysis.total()
    print(f"{title}: {total / unit:.2f} {unit_name}")
    for name, value in _by_module(analysis, model, unit):
        print(f"  {name:<14} {value:10.3f} {unit_name}")
    by_op = analysis.by_operator()
    print("  by operator: " + ", ".join(f"{op} {v / unit:.3f}" for op, v in sorted(by_op.items(), key=lambda x: -x[1])))
    uncounted = analysis.unsupported_ops()
    print("  uncounted operators: " + (", ".join(f"{op} (x{n})" for op, n in uncounted.items()) or "none"))
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--tasks", nargs="+", default=["parameter"], help=f"any of {', '.join(TASKS)}")
    parser.add_argument("--input-size", nargs=2, type=int, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("opts", nargs="*", help="config overrides key=value")
    add_trust_arguments(parser)
    args = parser.parse_args(argv)
    if not os.path.isfile(args.config_file):
        parser.error(f"--config-file {args.config_file!r} does not exist")
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown --tasks {unknown}; choose from {list(TASKS)}")
    if min(args.input_size) < 1:
        parser.error(f"--input-size must be positive, got {args.input_size}")

    import logging

    import torch
    from detectron2.config import instantiate

    from soit.config import load_config

    from soit.analysis import activation_count_analysis, flop_count_analysis

    logging.getLogger("fvcore").setLevel(logging.ERROR)  # "never called" notes for the criterion
    cfg = load_config(args.config_file, args.opts, trust_config=args.trust_config, trust_pickle=args.trust_pickle)
    model = instantiate(cfg.model).eval()
    if "parameter" in args.tasks:
        print_parameters(model)
    h, w = args.input_size
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if "flop" in args.tasks:
            analysis = flop_count_analysis(model, image)
            print_counts(f"FLOPs at {h}x{w}", analysis, model, 1e9, "GFLOPs")
        if "activation" in args.tasks:
            analysis = activation_count_analysis(model, image)
            print_counts(f"activations at {h}x{w}", analysis, model, 1e6, "M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
