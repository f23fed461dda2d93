#!/usr/bin/env python
"""Convert an official SOIT checkpoint (the authors' release) for this project.

    python tools/convert_official.py soit_r50.pth output/soit_r50_d2.pth [--overwrite]

The result loads with ``DetectionCheckpointer(model).load(OUT)`` (or
``train.init_checkpoint=OUT``) with no missing or unexpected keys.
"""

import argparse
import os
import sys

from soit.checkpoint import ConversionError, convert_checkpoint
from soit.config import add_trust_arguments


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="official checkpoint (.pth)")
    parser.add_argument("output", help="converted checkpoint to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument(
        "--config-file", default=None, help="model config to check against (default: configs/models/soit_r50.py)"
    )
    add_trust_arguments(parser)
    args = parser.parse_args(argv)
    if os.path.exists(args.output) and not args.overwrite:
        print(f"error: {args.output} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        summary = convert_checkpoint(
            args.input,
            args.output,
            overwrite=args.overwrite,
            config_file=args.config_file,
            trust_pickle=args.trust_pickle,
            trust_config=args.trust_config,
        )
    except (ConversionError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    arch = summary["architecture"]
    print(f"wrote {summary['out_path']}")
    print(f"  tensors converted: {summary['num_tensors']}")
    print(f"  parameters (elements): {summary['num_parameters']:,}")
    print(f"  dropped: {len(summary['dropped'])} BatchNorm num_batches_tracked counters")
    print(f"  shared mask branch: {summary['mask_branch_copies']} identical copies stored once")
    print(
        f"  ResNet-{arch['depth']} (blocks {arch['blocks']}, features {arch['out_features']}), "
        f"encoder layers {arch['num_encoder_layers']}, decoder layers {arch['num_decoder_layers']}, "
        f"mask-encoder layers {arch['mask_encoder_layers']}, classes {arch['num_classes']}, "
        f"queries {arch['num_queries'] if arch['num_queries'] else 'not stored (two-stage)'}, "
        f"levels {arch['num_levels']}, width {arch['embed_dim']}, mask channels {arch['mask_channels']}, "
        f"dynamic parameters {arch['num_dynamic_params']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
