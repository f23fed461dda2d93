#!/usr/bin/env python
"""Inference latency of one model in eager mode, as TorchScript and in onnxruntime (one row
per ONNX formulation of the attention, --attentions).

    python dev/benchmark_export.py --config-file configs/models/soit_r50.py \\
        --input-size 800 1333 --runs 3 --markdown

The model (random weights unless train.init_checkpoint is set) is exported into a temporary
folder with soit.export, then each runtime gets one warm-up call and --runs timed calls on the
same network input (the graph of soit/export.py: up to masks in the input size). The exported
outputs are compared with eager mode, so a figure is only printed for a correct export.
"""
import argparse
import os
import sys
import tempfile
import time

from soit.config import add_trust_arguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the other dev/ modules
from bench_timing import median_time  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input-size", nargs=2, type=int, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch / onnxruntime threads (0: their default)")
    parser.add_argument(
        "--attentions", nargs="+", default=["grid_sample", "gather"],
        help="ONNX formulations of the attention to time (grid_sample, gather; trt_plugin needs TensorRT)",
    )  # fmt: skip
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("opts", nargs="*", help="config overrides key=value")
    add_trust_arguments(parser)
    args = parser.parse_args(argv)
    if not os.path.isfile(args.config_file):
        parser.error(f"--config-file {args.config_file!r} does not exist")
    if set(args.attentions) - {"grid_sample", "gather"}:
        parser.error(f"--attentions takes grid_sample and gather (ONNX Runtime cannot run trt_plugin), got {args.attentions}")

    import onnxruntime as ort
    import torch
    from detectron2.config import instantiate

    from soit import export
    from soit.checkpoint.safe_load import SafeCheckpointer
    from soit.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config_file, args.opts, trust_config=args.trust_config, trust_pickle=args.trust_pickle)
    model = instantiate(cfg.model).eval()
    weights = cfg.get("train", {}).get("init_checkpoint", "")
    if weights:
        SafeCheckpointer(model, trust_pickle=args.trust_pickle, complete=True).load(weights)
    h, w = args.input_size
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        eager_out = model.inference([{"image": image}], do_postprocess=False)[0]
        rows.append(("eager (PyTorch)", *median_time(lambda: model.inference([{"image": image}], do_postprocess=False), args.runs), None))

        start = time.perf_counter()
        traced, names = export.export_torchscript(model, image, os.path.join(tmp, "model.ts"))
        ts_export = time.perf_counter() - start
        got = export.instances_from_outputs(traced(image), names)
        diff = export.max_differences(eager_out, got)
        rows.append(("TorchScript", *median_time(lambda: traced(image), args.runs), (ts_export, diff)))

        for attention in args.attentions:
            start = time.perf_counter()
            path = os.path.join(tmp, f"model_{attention}.onnx")
            names = export.export_onnx(model, image, path, attention=attention)
            onnx_export = time.perf_counter() - start
            options = ort.SessionOptions()
            if args.threads:
                options.intra_op_num_threads = args.threads
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            feed = {export.INPUT_NAME: image.numpy()}
            got = export.instances_from_outputs(session.run(None, feed), names)
            diff = export.max_differences(eager_out, got)
            timed = median_time(lambda: session.run(None, feed), args.runs)
            rows.append((f"onnxruntime (CPU), attention {attention}", *timed, (onnx_export, diff)))
            del session

    print(f"{args.config_file} at {h}x{w}, torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"{torch.get_num_threads()} threads, {args.runs} runs (median)")  # fmt: skip
    if args.markdown:
        print("| runtime | latency (s) | export (s) | max diff vs eager: scores / boxes (px) / mask prob. |")
        print("|---|---:|---:|---|")
    for name, median, times, extra in rows:
        export_s = f"{extra[0]:.1f}" if extra else "-"
        diffs = f"{extra[1]['scores']:.1e} / {extra[1]['pred_boxes']:.1e} / {extra[1]['pred_masks']:.1e}" if extra else "-"
        if args.markdown:
            print(f"| {name} | {median:.2f} | {export_s} | {diffs} |")
        else:
            print(f"{name:<20} median {median:.3f} s (runs {', '.join(f'{t:.3f}' for t in times)}), export {export_s} s, diffs {diffs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
