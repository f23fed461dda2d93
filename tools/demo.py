#!/usr/bin/env python
"""Run a SOIT LazyConfig model on images, a video or a webcam and draw its detections.

    python tools/demo.py --config-file configs/soit_r50_50ep.py --weights model_final.pth \\
        --input photos/ extra/*.jpg --output drawn/
    python tools/demo.py --config-file configs/quickstart/soit_nuclei_cpu.py \\
        --weights output/quickstart/model_final.pth --video-input cells.mp4 --output cells_drawn.mp4
    python tools/demo.py --config-file ... --input a.jpg model.max_detections=50   # overrides last

``--input`` takes files, folders (their images, sorted) and glob patterns, read as training
reads them (EXIF orientation applied; 16-bit images scaled from the full 16-bit range, see
``soit.data.dataset_mapper.read_image_8bit``). Without ``--output`` only a summary per
image is printed: no window is ever opened, so the demo runs headless. Existing output
files are kept unless ``--overwrite`` is given.
"""
import argparse
import glob
import logging
import os
import re
import sys
import time

from soit.config import add_trust_arguments

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_FALLBACK_FPS = 10.0
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\[\]]*=")

logger = logging.getLogger("soit.demo")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="LazyConfig .py/.yaml")
    parser.add_argument("--weights", help="checkpoint; default train.init_checkpoint of the config")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files, folders or glob patterns")
    source.add_argument("--video-input", help="a video file")
    source.add_argument("--webcam", action="store_true", help="camera 0 (needs --output: nothing is displayed)")
    parser.add_argument("--output", help="image file or folder; video file for --video-input/--webcam")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="draw/count scores >= this")
    parser.add_argument("--device", default="cpu")
    add_trust_arguments(parser)
    parser.add_argument("opts", nargs="*", help="config overrides key=value, after all other arguments")
    return parser


def parse_args(parser, argv=None):
    args = parser.parse_args(argv)
    # `--input a.jpg model.x=1` gives the override to --input (nargs="+"): hand back every
    # key=value item that is not an existing file
    if args.input:
        overrides = [p for p in args.input if _OVERRIDE.match(p) and not os.path.exists(p)]
        args.input = [p for p in args.input if p not in overrides]
        args.opts = overrides + args.opts
        if not args.input:
            parser.error("--input needs at least one image, folder or pattern before the key=value overrides")
    return args


def expand_inputs(patterns, error):
    """[(path, explicit)] for files, folders (sorted images inside) and glob patterns, in the
    given order; ``explicit`` marks a file named as such (an unreadable one is an error)."""
    paths, seen = [], set()
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(os.path.join(pattern, f) for f in os.listdir(pattern) if _is_image(f))
            found = [(p, False) for p in found if os.path.isfile(p)]
            what = f"folder {pattern!r} holds no image ({', '.join(IMAGE_EXTENSIONS)})"
        elif os.path.isfile(pattern):
            found, what = [(pattern, True)], ""
        else:
            found = [(p, False) for p in sorted(glob.glob(pattern)) if os.path.isfile(p) and _is_image(p)]
            what = f"--input {pattern!r} matches no file (nor image in a folder)"
        if not found:
            error(what)
        for path, explicit in found:
            if path not in seen:
                seen.add(path)
                paths.append((path, explicit))
    return paths


def _is_image(path):
    return path.lower().endswith(IMAGE_EXTENSIONS)


def image_outputs(paths, output, error, overwrite):
    """Output path of each ``(path, explicit)`` input: ``output`` itself for one image and a file-like name,
    else ``output/<base name>``, with ``_1``, ``_2`` ... before the extension for repeats."""
    if output is None:
        return [None] * len(paths)
    is_file = len(paths) == 1 and _is_image(output) and not os.path.isdir(output)
    if is_file:
        outputs = [output]
    else:
        if os.path.isfile(output):
            error(f"--output {output!r} is a file, but {len(paths)} images need a folder")
        outputs, used = [], set()
        for path, _ in paths:
            stem, ext = os.path.splitext(os.path.basename(path))
            name, k = stem + ext, 0
            while name in used:
                k += 1
                name = f"{stem}_{k}{ext}"
            used.add(name)
            outputs.append(os.path.join(output, name))
    _refuse_existing(outputs, error, overwrite)
    return outputs


def _refuse_existing(outputs, error, overwrite):
    existing = [p for p in outputs if os.path.exists(p)]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        error(f"output {existing[0]!r}{more} already exists; pass --overwrite to replace it, or choose another --output")


def draw(image_bgr, instances, metadata):
    """``image_bgr`` (H, W, 3) with ``instances`` drawn on it, BGR."""
    from detectron2.utils.visualizer import ColorMode, Visualizer

    vis = Visualizer(image_bgr[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE)
    return vis.draw_instance_predictions(instances).get_image()[:, :, ::-1]


def run_images(predictor, paths, outputs, threshold):
    """Predict, count and (where an output is given) draw each image; returns the number done."""
    import cv2
    from tqdm import tqdm

    from soit.data.dataset_mapper import read_image_8bit

    done = 0
    for (path, explicit), out in zip(tqdm(paths, disable=len(paths) < 2, unit="img"), outputs):
        try:
            # the reader of training and evaluation: the model sees a 16-bit image scaled as it learnt it
            image = read_image_8bit(path, format="BGR")
        except Exception as e:
            if explicit:
                raise SystemExit(f"cannot read image {path!r}: {e}") from e
            logger.warning(f"skipping {path!r}: cannot read it as an image ({e})")
            continue
        start = time.perf_counter()
        instances = predictor(image, format="BGR")
        instances = instances[instances.scores >= threshold]
        logger.info(
            f"{path}: {len(instances)} detections with score >= {threshold} in {time.perf_counter() - start:.2f}s"
        )
        if out is not None:
            os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
            if not cv2.imwrite(out, draw(image, instances, predictor.metadata)):
                raise SystemExit(f"could not write {out!r} (is the extension one OpenCV can encode?)")
        done += 1
    return done


def run_video(predictor, capture, output, threshold, name):
    """Predict and draw every frame of ``capture`` into ``output`` (mp4v); returns the frame count."""
    import cv2
    from detectron2.utils.video_visualizer import VideoVisualizer
    from tqdm import tqdm

    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and fps > 0 else VIDEO_FALLBACK_FPS  # NaN and 0 both mean unknown
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    visualizer = VideoVisualizer(predictor.metadata)
    writer, frames = None, 0
    try:
        with tqdm(total=total if total > 0 else None, unit="frame") as bar:
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                instances = predictor(frame, format="BGR")
                instances = instances[instances.scores >= threshold]
                frames += 1
                bar.update()
                if output is None:
                    continue
                if writer is None:
                    height, width = frame.shape[:2]
                    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
                    writer = cv2.VideoWriter(output, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height), True)
                    if not writer.isOpened():
                        raise SystemExit(f"cannot write the video {output!r} (mp4v, {width}x{height})")
                drawn = visualizer.draw_instance_predictions(frame[:, :, ::-1], instances).get_image()
                writer.write(drawn[:, :, ::-1])
    except KeyboardInterrupt:  # the webcam runs until stopped: keep what was written
        logger.info("interrupted")
    finally:
        if writer is not None:
            writer.release()
        capture.release()
    logger.info(f"{name}: {frames} frames" + (f" written to {output}" if output else ""))
    return frames


def main(argv=None) -> int:
    parser = get_parser()
    args = parse_args(parser, argv)
    if not os.path.isfile(args.config_file):
        parser.error(f"--config-file {args.config_file!r} does not exist")
    if args.webcam and not args.output:
        parser.error("--webcam needs --output (a video file): the demo opens no display")

    if args.input:
        paths = expand_inputs(args.input, parser.error)
        outputs = image_outputs(paths, args.output, parser.error, args.overwrite)
    else:
        import cv2

        if args.video_input and not os.path.isfile(args.video_input):
            parser.error(f"--video-input {args.video_input!r} does not exist")
        output = args.output
        if output and os.path.isdir(output):
            stem = os.path.splitext(os.path.basename(args.video_input or "webcam"))[0]
            output = os.path.join(output, stem + ".mp4")
        if output:
            _refuse_existing([output], parser.error, args.overwrite)
        capture = cv2.VideoCapture(args.video_input if args.video_input else 0)
        name = repr(args.video_input) if args.video_input else "the webcam (camera 0)"
        if not capture.isOpened():
            parser.error(f"cannot open {name} for reading (not a video OpenCV can decode?)")

    from detectron2.utils.logger import setup_logger
    from tqdm.contrib.logging import logging_redirect_tqdm

    from soit.engine import Predictor

    setup_logger(name="soit")
    setup_logger(name="fvcore")  # the checkpointer reports missing and unexpected weights there
    predictor = Predictor(
        args.config_file, checkpoint=args.weights, device=args.device, overrides=args.opts,
        trust_pickle=args.trust_pickle, trust_config=args.trust_config,
    )  # fmt: skip
    with logging_redirect_tqdm([logging.getLogger("soit")]):
        if args.input:
            run_images(predictor, paths, outputs, args.confidence_threshold)
        else:
            run_video(predictor, capture, output, args.confidence_threshold, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
