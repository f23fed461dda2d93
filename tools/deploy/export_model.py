#!/usr/bin/env python
"""Export a SOIT LazyConfig model to TorchScript or ONNX through detectron2's TracingAdapter.

    python tools/deploy/export_model.py --config-file configs/soit_r50_50ep.py \\
        --format torchscript --export-method tracing --sample-image input.jpg \\
        --output exported/ train.init_checkpoint=model_final.pth

The sample image is read in the model's channel order and resized by the config's test-time
augmentation (``dataloader.test.mapper.augmentation``), exactly as evaluation feeds the
model; without ``--sample-image`` a synthetic 480 x 640 image is used. The exported graph runs
at any input size: the sample only drives the trace. The export is then run once more on the
sample and compared with eager mode (``--no-check`` skips that).

Written files (OUTPUT is a folder): ``model.ts`` or ``model.onnx``, and ``<file>.json``
describing the input, the outputs and the post-processing (see soit/export.py). Existing
files are kept unless ``--overwrite`` is given.
"""
import argparse
import logging
import os
import sys
import time

from soit.config import add_trust_arguments


logger = logging.getLogger("soit.export")

FILE_NAMES = {"torchscript": "model.ts", "onnx": "model.onnx"}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig (.py or .yaml)")
    parser.add_argument("--format", required=True, help="torchscript or onnx")
    parser.add_argument("--export-method", default="tracing", help="tracing (the only method SOIT supports)")
    parser.add_argument("--sample-image", default=None, help="image to trace with (default: synthetic)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--device", default="cpu", help="device to trace on (cuda: the graph keeps our kernel)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 16 with --attention grid_sample)")
    parser.add_argument(
        "--attention", default="grid_sample",
        help="ONNX: how the graph expresses the deformable attention: grid_sample (GridSample nodes), gather "
        "(indices and Gather, no GridSample) or trt_plugin (TensorRT's MultiscaleDeformableAttnPlugin_TRT node; "
        "ONNX Runtime cannot run it); docs/deployment.md",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace existing exported files")
    parser.add_argument("--no-check", action="store_true", help="skip comparing the export with eager mode")
    add_trust_arguments(parser)
    parser.add_argument("opts", nargs="*", default=[], help="config overrides key=value")
    return parser


def sample_input(cfg, model, path):
    """The network input for the trace: (3, H, W) uint8 in the model's channel order."""
    import numpy as np
    import torch
    from detectron2.config import instantiate
    from detectron2.data import detection_utils as utils
    from detectron2.data import transforms as T

    from soit.engine.predictor import config_test_augmentations

    if path is None:
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
        source = "synthetic 480x640"
    else:
        try:
            image = utils.read_image(path, format=model.input_format)
        except Exception as e:  # PIL's errors do not name the file
            raise ValueError(f"--sample-image {path} is not a readable image ({type(e).__name__}: {e})") from e
        source = path
    augs = [instantiate(a) for a in config_test_augmentations(cfg)]
    if augs:
        image = T.AugmentationList(augs)(T.AugInput(image)).apply_image(image)
    tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return tensor, source


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.format not in FILE_NAMES:
        parser.error(f"--format must be one of {sorted(FILE_NAMES)}, got {args.format!r}")
    if args.export_method != "tracing":
        parser.error(f"--export-method {args.export_method!r} is not supported: SOIT exports by tracing")
    if not os.path.isfile(args.config_file):
        parser.error(f"--config-file {args.config_file!r} does not exist")
    if args.sample_image is not None and not os.path.isfile(args.sample_image):
        parser.error(f"--sample-image {args.sample_image!r} does not exist")
    if args.attention not in ("grid_sample", "gather", "trt_plugin"):
        parser.error(f"--attention must be grid_sample, gather or trt_plugin, got {args.attention!r}")
    if args.format == "onnx" and args.attention == "grid_sample" and args.opset < 16:
        parser.error(f"--opset {args.opset}: ONNX has GridSample from opset 16 on (or use --attention gather)")
    out_file = os.path.join(args.output, FILE_NAMES[args.format])
    info_file = out_file + ".json"
    for path in (out_file, info_file):
        if os.path.exists(path) and not args.overwrite:
            parser.error(f"{path} exists; pass --overwrite to replace it")

    import torch
    from detectron2.config import instantiate
    from detectron2.utils.logger import setup_logger

    from soit import export
    from soit.checkpoint.safe_load import SafeCheckpointer
    from soit.config import load_config

    setup_logger(name="soit")
    setup_logger(name="fvcore")
    cfg = load_config(args.config_file, args.opts, trust_config=args.trust_config, trust_pickle=args.trust_pickle)
    model = instantiate(cfg.model).to(args.device).eval()
    weights = cfg.get("train", {}).get("init_checkpoint", "")
    if weights:
        SafeCheckpointer(model, trust_pickle=args.trust_pickle, complete=True).load(weights)
    else:
        logger.warning("train.init_checkpoint is empty: exporting a randomly initialised model")
    image, source = sample_input(cfg, model, args.sample_image)
    image = image.to(args.device)
    with torch.no_grad():  # an input the model cannot take fails here, eagerly, before anything is written
        eager = model.inference([{"image": image}], do_postprocess=False)[0]

    os.makedirs(args.output, exist_ok=True)
    start = time.perf_counter()
    tmp = out_file + ".partial"
    if args.format == "torchscript":
        _, names = export.export_torchscript(model, image, tmp)
    else:
        names = export.export_onnx(model, image, tmp, opset=args.opset, attention=args.attention)
    os.replace(tmp, out_file)
    onnx_args = {"opset": args.opset, "attention": args.attention} if args.format == "onnx" else {}
    export.write_export_info(info_file, model, args.format, names, image.shape[1:], **onnx_args)
    elapsed = time.perf_counter() - start

    print(f"exported {args.config_file} to {args.format} in {elapsed:.1f} s")
    print(f"  model:   {out_file} ({os.path.getsize(out_file) / 2**20:.1f} MiB)")
    print(f"  info:    {info_file}")
    print(f"  traced:  {source} -> network input {tuple(image.shape[1:])}, device {args.device}")
    print(f"  input:   {export.INPUT_NAME} (3, height, width) {model.input_format}, any size")
    print(f"  outputs: {', '.join(names)}")
    if args.format == "onnx":
        ops = export.onnx_op_counts(out_file)
        print(f"  graph:   {sum(ops.values())} nodes, attention as {args.attention}; GridSample: {ops.get('GridSample', 0)}")
        print("  ops:     " + ", ".join(f"{op} {n}" for op, n in ops.items()))
        if ops.get("GridSample", 0):
            print(
                "  note:    TensorRT has been reported to compute GridSample wrongly in DETR-style graphs without "
                "an error; for TensorRT export with --attention gather or trt_plugin (docs/deployment.md)"
            )

    if not args.no_check:
        with torch.no_grad():
            if args.format == "torchscript":
                got = export.instances_from_outputs(torch.jit.load(out_file)(image), names)
            elif args.attention == "trt_plugin":  # ONNX Runtime cannot run TensorRT's node: our reference runs it
                outputs = export.run_onnx_with_reference_plugin(out_file, image.cpu().numpy())
                got = export.instances_from_outputs(outputs, names)
            else:
                import onnxruntime as ort

                session = ort.InferenceSession(out_file, providers=["CPUExecutionProvider"])
                got = export.instances_from_outputs(session.run(None, {export.INPUT_NAME: image.cpu().numpy()}), names)
        diffs = export.max_differences(eager, got)
        how = " (plugin nodes computed by our reference implementation)" if args.attention == "trt_plugin" else ""
        print(f"  check:   exported vs eager on the sample{how}, max |difference|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
