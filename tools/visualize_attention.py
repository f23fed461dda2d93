#!/usr/bin/env python
"""Draw where a trained SOIT model looks for its detections in one image.

    python tools/visualize_attention.py --config-file configs/quickstart/soit_nuclei_cpu.py \\
        --weights output/quickstart/model_final.pth --input tile.png --output attention/ --top 3
    python tools/visualize_attention.py --config-file ... --input photo.jpg --output attention/ \\
        --detections 0 4 --crop 100 50 256 256      # overrides (key=value) last

For each chosen detection (``--detections`` indices, ordered by score as the model returns
them, or the ``--top`` best) one PNG of three panels, ``<image>_attention_<index>.png``:

1. the detection's mask and box, the two-stage proposal its query started from (dashed,
   white) and the points the decoder's last layer sampled for the query (colour = feature
   level: yellow stride 8, cyan 16, magenta 32, green 64; dot size = attention weight);
2. the points the detection's own mask-head layer sampled for one pixel inside its mask
   (green) and one outside it (red);
3. the points the encoder's last layer sampled for the token at the box centre.

The points are the ones the attention op received in one forward pass of the model over the
image as the network sees it (after the test augmentations of the config), not a
re-computation (``soit.visualize_attention``). The pass is one plain pass over the whole
image: a model trained on crops is best shown a crop of about its training size
(``--crop``); the automatic magnification and tiling of ``tools/demo.py`` are not applied.
Existing pictures are kept unless ``--overwrite`` is given.
"""
import argparse
import logging
import os
import re
import sys

from soit.config import add_trust_arguments

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\[\]]*=")

logger = logging.getLogger("soit.visualize_attention")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="LazyConfig .py/.yaml")
    parser.add_argument("--weights", help="checkpoint; default train.init_checkpoint of the config")
    parser.add_argument("--input", required=True, help="one image file")
    parser.add_argument("--output", required=True, help="folder for the pictures (created if missing)")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--detections", type=int, nargs="+", help="indices of the detections to draw (0 = best)")
    chosen.add_argument("--top", type=int, default=3, help="draw the N best detections (default 3)")
    parser.add_argument(
        "--crop", type=int, nargs=4, metavar=("X", "Y", "W", "H"), help="look at this region of the image only"
    )
    parser.add_argument("--radius", type=float, default=6.0, help="dot radius of the heaviest sampling point, pixels")
    parser.add_argument("--overwrite", action="store_true", help="replace existing pictures")
    parser.add_argument("--device", default="cpu")
    add_trust_arguments(parser)
    parser.add_argument("opts", nargs="*", help="config overrides key=value, after all other arguments")
    return parser


def check_args(parser, args):
    if not os.path.isfile(args.config_file):
        parser.error(f"--config-file {args.config_file!r} does not exist")
    if not os.path.isfile(args.input):
        parser.error(f"--input {args.input!r} does not exist (one image file)")
    if os.path.isfile(args.output):
        parser.error(f"--output {args.output!r} is a file; give a folder for the pictures")
    if args.detections is None and args.top < 1:
        parser.error(f"--top must be >= 1, got {args.top}")
    if args.detections is not None and min(args.detections) < 0:
        parser.error(f"--detections are indices >= 0, got {args.detections}")
    if args.crop is not None and (args.crop[0] < 0 or args.crop[1] < 0 or min(args.crop[2:]) < 1):
        parser.error(f"--crop X Y W H needs X, Y >= 0 and W, H >= 1, got {args.crop}")
    bad = [o for o in args.opts if not _OVERRIDE.match(o)]
    if bad:
        parser.error(f"overrides must be key=value, got {bad[0]!r}")


def read_region(path, crop):
    """The image as (H, W, 3) uint8 RGB, read as training reads it, cut to ``crop`` (x, y, w, h)."""
    from soit.data.dataset_mapper import read_image_8bit

    try:
        image = read_image_8bit(path, format="RGB")
    except Exception as e:
        raise SystemExit(f"cannot read image {path!r}: {e}") from e
    if crop is None:
        return image
    x, y, w, h = crop
    height, width = image.shape[:2]
    if x + w > width or y + h > height:
        raise SystemExit(f"--crop {x} {y} {w} {h} reaches outside the {width}x{height} image {path!r}")
    return image[y : y + h, x : x + w]


def output_paths(out_dir, image_path, indices):
    stem = os.path.splitext(os.path.basename(image_path))[0]
    return [os.path.join(out_dir, f"{stem}_attention_{i}.png") for i in indices]


def refuse_existing(paths, overwrite):
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise SystemExit(
            f"output {existing[0]!r}{more} already exists; pass --overwrite to replace it, or choose another --output"
        )


def visualize(predictor, image_rgb, image_path, out_dir, detections=None, top=3, radius=6.0, overwrite=False):
    """Write one three-panel picture per chosen detection; returns the paths written.

    ``predictor``: a :class:`soit.engine.Predictor` (its model, test augmentations and
    metadata are used); ``image_rgb``: (H, W, 3) uint8. Raises ``SystemExit`` naming the
    index when a chosen detection does not exist, and before running the model when a
    picture for an explicitly chosen index exists and ``overwrite`` is False."""
    import numpy as np
    from PIL import Image

    from soit.visualize_attention import attention_of_detections, draw_attention

    if detections is not None:  # known before the forward: refuse early
        refuse_existing(output_paths(out_dir, image_path, detections), overwrite)
    x = predictor._to_input(image_rgb, "RGB")
    try:
        found = attention_of_detections(predictor.model, x["image"].to(predictor.model.device), detections, top)
    except ValueError as e:
        raise SystemExit(f"{image_path}: {e}") from e
    if not found["detections"]:
        logger.warning(f"{image_path}: the model returned no detection; nothing drawn")
        return []
    indices = [entry["index"] for entry in found["detections"]]
    paths = output_paths(out_dir, image_path, indices)
    refuse_existing(paths, overwrite)
    # the picture is of the image as the network saw it (test augmentations applied), in RGB
    seen = x["image"].permute(1, 2, 0).cpu().numpy()
    seen = np.ascontiguousarray(seen[:, :, ::-1] if predictor.input_format == "BGR" else seen)
    instances = found["instances"].to("cpu")
    os.makedirs(out_dir, exist_ok=True)
    for entry, path in zip(found["detections"], paths):
        Image.fromarray(draw_attention(seen, entry, instances, predictor.metadata, radius)).save(path)
        logger.info(
            f"detection {entry['index']} (query {entry['query']}, score {entry['score']:.2f}, "
            f"class {entry['label']}): {path}"
        )
    return paths


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    image = read_region(args.input, args.crop)

    from detectron2.utils.logger import setup_logger

    from soit.engine import Predictor

    setup_logger(name="soit")
    setup_logger(name="fvcore")
    predictor = Predictor(
        args.config_file, checkpoint=args.weights, device=args.device, overrides=args.opts,
        trust_pickle=args.trust_pickle, trust_config=args.trust_config,
    )  # fmt: skip
    trained = getattr(predictor.model, "training_scale", None)
    size = getattr(trained, "input_size", None)
    if size is not None and max(image.shape[:2]) > 1.5 * max(size):
        logger.warning(
            f"the model was trained on {size[0]}x{size[1]} inputs and is shown {image.shape[0]}x{image.shape[1]} in "
            f"one pass: objects may be missed or cut; --crop a region of about the training size"
        )
    visualize(predictor, image, args.input, args.output, args.detections, args.top, args.radius, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
