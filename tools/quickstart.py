#!/usr/bin/env python
"""The CPU quick start: train a small SOIT on the nuclei dataset and evaluate it.

1. prepares the small real dataset (``datasets/nuclei``: 3 training tiles, 1 held out) as
   COCO JSON + PNGs and registers it with ``register_coco_instances``;
2. evaluates the untrained model with ``COCOEvaluator`` (the baseline), trains with
   the training loop of ``train_net.py`` (``soit.engine.training``) (config ``configs/quickstart/soit_nuclei_cpu.py``), whose last
   step evaluates the trained model on the held-out tile;
3. writes ``metrics.json`` and pictures of the predicted masks (``vis/``) to the output
   folder and prints where they are.

Usage: python tools/quickstart.py [--output-dir output/quickstart] [--overwrite] [key=value ...]
"""
import argparse
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = os.path.join(REPO, "configs", "quickstart", "soit_nuclei_cpu.py")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config-file", default=CONFIG,
        help="the quick start's config (default: the small-data recipe; configs/quickstart/soit_nuclei_cpu_paper.py "
        "trains as the paper does)",
    )
    parser.add_argument("--output-dir", default=os.path.join(REPO, "output", "quickstart"))
    parser.add_argument("--data-root", default=os.path.join(REPO, "datasets", "nuclei"))
    parser.add_argument("--overwrite", action="store_true", help="replace a previous quick start's output folder")
    parser.add_argument(
        "--vis-threshold", type=float, default=0.2,
        help="score above which predictions are drawn (a short CPU training gives low confidences)",
    )
    parser.add_argument("opts", nargs="*", help="config overrides, e.g. train.max_iter=100")
    return parser.parse_args(argv)


def draw_predictions(cfg, model, out_dir, score_threshold=0.2):
    """Predicted masks over the held-out images, one PNG each."""
    import numpy as np
    import torch
    from detectron2.config import instantiate
    from detectron2.data import MetadataCatalog
    from detectron2.utils.visualizer import ColorMode, Visualizer
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    loader = instantiate(cfg.dataloader.test)
    metadata = MetadataCatalog.get(cfg.dataloader.test.dataset.names)
    paths = []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            for inputs, outputs in zip(batch, model(batch)):
                inst = outputs["instances"].to("cpu")
                inst = inst[inst.scores > score_threshold]
                image = np.asarray(Image.open(inputs["file_name"]).convert("RGB"))
                vis = Visualizer(image, metadata, instance_mode=ColorMode.SEGMENTATION)
                drawn = vis.draw_instance_predictions(inst).get_image()
                path = os.path.join(out_dir, os.path.splitext(os.path.basename(inputs["file_name"]))[0] + "_pred.png")
                Image.fromarray(drawn).save(path)
                paths.append(path)
    return paths


# what a quick-start run writes into its folder; --overwrite removes these and nothing else
MARKER = ".soit-quickstart"
WRITTEN = ("config.yaml", "log.txt", "metrics.json", "eval_untrained.json", "eval_results.json", "last_checkpoint",
           "model_*.pth", "events.out.tfevents.*", "vis", MARKER)  # fmt: skip


def clear_previous_run(output_dir, overwrite):
    """None when ``output_dir`` may be used (removing a previous quick start's files when
    ``overwrite``), else the message saying why not."""
    import fnmatch

    entries = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    if not entries:
        return None
    if MARKER not in entries:
        return (f"{output_dir} is not empty and was not written by the quick start ({', '.join(sorted(entries)[:5])}"
                f"{', ...' if len(entries) > 5 else ''}); choose another --output-dir. Nothing was changed.")  # fmt: skip
    if not overwrite:
        return f"{output_dir} already holds a quick-start run; pass --overwrite to replace it (or --output-dir DIR)."
    ours = [e for e in entries if any(fnmatch.fnmatch(e, pattern) for pattern in WRITTEN)]
    for entry in ours:
        path = os.path.join(output_dir, entry)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    kept = sorted(set(entries) - set(ours))
    if kept:
        print(f"[quickstart] --overwrite removed the previous run's files; kept files it did not write: {kept}")
    return None


def main(argv=None):
    args = parse_args(argv)
    refused = clear_previous_run(args.output_dir, args.overwrite)
    if refused:
        print(refused)
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, MARKER), "w") as f:
        f.write("written by tools/quickstart.py; --overwrite removes only the files it writes\n")

    from detectron2.config import LazyConfig, instantiate
    from detectron2.engine import default_argument_parser, default_setup

    from soit.data.nuclei import prepare_nuclei, register_nuclei
    from soit.engine import training
    from soit.engine.overrides import apply_overrides

    prepare_nuclei(args.data_root)
    register_nuclei(args.data_root)

    cfg = LazyConfig.load(args.config_file)
    cfg = apply_overrides(cfg, [f"train.output_dir={args.output_dir}"] + list(args.opts))
    train_args = default_argument_parser().parse_args(["--config-file", args.config_file])
    default_setup(cfg, train_args)
    training.setup_soit_logger(args.output_dir)  # skipped images and dropped annotations into log.txt

    start = time.time()
    model = instantiate(cfg.model)
    print("[quickstart] evaluating the untrained model (baseline)", flush=True)
    untrained = training.do_test(cfg, model)
    os.rename(os.path.join(args.output_dir, "eval_results.json"), os.path.join(args.output_dir, "eval_untrained.json"))

    print(f"[quickstart] training for {cfg.train.max_iter} iterations on the CPU", flush=True)
    train_start = time.time()
    training.do_train(train_args, cfg)
    train_time = time.time() - train_start  # includes the final evaluation

    # the training loop's last hook evaluated the final weights on the held-out tile
    with open(os.path.join(args.output_dir, "eval_results.json")) as f:
        trained = json.load(f)
    from soit.checkpoint.safe_load import SafeCheckpointer

    model = instantiate(cfg.model)
    SafeCheckpointer(model, complete=True).load(os.path.join(args.output_dir, "model_final.pth"))
    pictures = draw_predictions(cfg, model, os.path.join(args.output_dir, "vis"), args.vis_threshold)

    metrics = {
        "trained": trained,
        "untrained": untrained,
        "iterations": cfg.train.max_iter,
        "seconds": round(time.time() - start, 1),
        "train_seconds": round(train_time, 1),
        "checkpoint": os.path.join(args.output_dir, "model_final.pth"),
    }
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print()
    for task in ("bbox", "segm"):
        print(f"[quickstart] {task} AP: {trained[task]['AP']:.1f} (untrained model: {untrained[task]['AP']:.1f})")
    print(f"[quickstart] metrics:     {os.path.join(args.output_dir, 'metrics.json')}")
    print(f"[quickstart] pictures:    {os.path.dirname(pictures[0]) if pictures else '(none)'}")
    print(f"[quickstart] checkpoint:  {metrics['checkpoint']}")
    print(
        "[quickstart] evaluate it again with: python train_net.py --eval-only --config-file "
        f"{os.path.relpath(args.config_file)} train.init_checkpoint={metrics['checkpoint']} "
        f"train.output_dir={args.output_dir}/eval"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
