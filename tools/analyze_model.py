#!/usr/bin/env python
"""Parameter count of a SOIT LazyConfig model, per top-level module.

    python tools/analyze_model.py --config-file configs/models/soit_r50.py

The "checkpoint-equivalent" total adds the backbone's FrozenBN weights and biases (buffers
here, parameters in torchvision-style checkpoints such as the official release's).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def count_parameters(model):
    from detectron2.layers import FrozenBatchNorm2d

    rows = {}
    for name, child in model.named_children():
        params = sum(p.numel() for p in child.parameters())
        frozen = sum(m.weight.numel() + m.bias.numel() for m in child.modules() if isinstance(m, FrozenBatchNorm2d))
        if params or frozen:
            rows[name] = (params, frozen)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("opts", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.config_file):
        parser.error(f"--config-file {args.config_file!r} does not exist")

    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    model = instantiate(cfg.model)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
