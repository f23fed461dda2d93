#!/usr/bin/env python
"""Parameters, FLOPs, activations and training memory of a SOIT LazyConfig model at a given
input size.

    python tools/analyze_model.py --config-file configs/models/soit_r50.py \\
        --tasks parameter flop activation --input-size 800 1333
    python tools/analyze_model.py --config-file configs/models/soit_r50.py --tasks memory \\
        --input-size 800 1333 --batch-sizes 1 2 --precisions fp32 bf16 --checkpointing none all

Parameters: per top-level module; the "checkpoint-equivalent" total adds the backbone's
FrozenBN weights and biases (buffers here, parameters in torchvision-style checkpoints such
as the official release's).

FLOPs (fused multiply-adds, fvcore's convention) and activations are counted on the graph
that export traces, for one image of --input-size (the network input, after any resizing),
with the multi-scale deformable attention counted by its own handle (soit/analysis.py);
operators that no handle counts are listed. Random weights are used: the counts do not
depend on them.

Memory: one training step (forward + backward) per batch size, precision and activation-
checkpointing setting ("none", "all", or parts joined by commas, e.g. "encoder,decoder") on
synthetic images holding --num-objects objects each, on --device; the allocator's peak is
measured, parameters and AdamW state are derived, and so is whether a GPU of 8 to 80 GiB
holds the run (soit/engine/memory.py says how). --compare-gradients also prints each row's
largest gradient difference to the row without checkpointing (relative to the gradient's
largest value).
"""
import argparse
import os
import sys

from soit.config import add_trust_arguments


TASKS = ("parameter", "flop", "activation", "memory")


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


def checkpointing_settings(values):
    from soit.modeling.activation_checkpointing import PARTS, check_parts

    settings = []
    for value in values:
        parts = () if value == "none" else PARTS if value == "all" else check_parts(value.split(","))
        settings.append((value, list(parts)))
    return settings


def print_memory(cfg, args):
    import torch
    from detectron2.config import instantiate

    from soit.engine.memory import (
        GPU_SIZES_GIB, fits, largest_relative_difference, synthetic_batch, training_step_memory,
    )  # fmt: skip

    mib, gib = 2**20, 2**30
    h, w = args.input_size
    columns = ["batch", "precision", "checkpointing", "parameters MiB", "AdamW state MiB", "step peak MiB",
               "of which gradients MiB", "total GiB", "step s"] + [f"{g} GB" for g in GPU_SIZES_GIB]  # fmt: skip
    if args.compare_gradients:
        columns.append("gradient difference")
    print(f"training memory at {h}x{w}, {args.num_objects} objects per image, on {args.device}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for batch_size in args.batch_sizes:
        batch = synthetic_batch(batch_size, h, w, args.num_objects, cfg.model.num_classes)
        for precision in args.precisions:
            reference = None
            for name, parts in checkpointing_settings(args.checkpointing):
                cfg.model.activation_checkpointing = parts
                torch.manual_seed(0)
                model = instantiate(cfg.model).to(args.device)
                r = training_step_memory(model, batch, precision, keep_gradients=args.compare_gradients)
                on_gpu = r["measured_on"] == "cuda allocator"
                row = [batch_size, precision, name, f"{r['parameters'] / mib:,.0f}", f"{r['optimizer_state'] / mib:,.0f}",
                       f"{r['step_peak'] / mib:,.0f}", f"{r['gradients'] / mib:,.0f}", f"{r['total'] / gib:.2f}",
                       f"{r['seconds']:.1f}"]  # fmt: skip
                row += ["yes" if fits(r["total"], g, on_gpu) else "no" for g in GPU_SIZES_GIB]
                if args.compare_gradients:
                    if reference is None:
                        reference = r["grads"]
                        row.append("(reference)")
                    else:
                        diff = largest_relative_difference(reference, r["grads"])
                        row.append("parameters differ" if diff is None else f"{diff:.1e}")
                print("| " + " | ".join(str(c) for c in row) + " |", flush=True)
                del model, r


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--tasks", nargs="+", default=["parameter"], help=f"any of {', '.join(TASKS)}")
    parser.add_argument("--input-size", nargs=2, type=int, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1], help="memory: images per step")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], help="memory: any of fp32 fp16 bf16")
    parser.add_argument(
        "--checkpointing", nargs="+", default=["none", "all"],
        help="memory: activation-checkpointing settings: none, all, or parts joined by commas",
    )  # fmt: skip
    parser.add_argument("--num-objects", type=int, default=20, help="memory: objects per synthetic image")
    parser.add_argument("--compare-gradients", action="store_true", help="memory: gradient difference to the first setting")
    parser.add_argument("--device", default="cpu", help="memory: cpu or cuda")
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
    if min(args.batch_sizes) < 1 or args.num_objects < 1:
        parser.error("--batch-sizes and --num-objects must be >= 1")
    if set(args.precisions) - {"fp32", "fp16", "bf16"}:
        parser.error(f"--precisions takes fp32, fp16 or bf16, got {args.precisions}")
    try:
        checkpointing_settings(args.checkpointing)
    except ValueError as e:
        parser.error(f"--checkpointing: {e}")

    import logging

    import torch
    from detectron2.config import instantiate

    from soit.config import load_config

    from soit.analysis import activation_count_analysis, flop_count_analysis

    logging.getLogger("fvcore").setLevel(logging.ERROR)  # "never called" notes for the criterion
    cfg = load_config(args.config_file, args.opts, trust_config=args.trust_config, trust_pickle=args.trust_pickle)
    if "memory" in args.tasks:
        print_memory(cfg, args)
        if set(args.tasks) == {"memory"}:
            return 0
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
