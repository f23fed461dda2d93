#!/usr/bin/env python
"""The CPU quick start: train a small SOIT on the nuclei dataset and evaluate it.

1. prepares the small real dataset (``datasets/nuclei``: 3 training tiles, 1 held out) as
   COCO JSON + PNGs and registers it with ``register_coco_instances``;
2. evaluates the untrained model with ``COCOEvaluator`` (the baseline), trains with the
   training loop of ``train_net.py`` (``soit.engine.training``; config
   ``configs/quickstart/soit_nuclei_cpu.py``, which keeps two periodic checkpoints and
   ``model_final.pth``), whose last step evaluates the trained model on the held-out tile;
3. writes ``metrics.json`` (strict JSON: an undefined metric is ``null``) and pictures of the
   predicted masks (``vis/``) to the output folder and prints where they are.

Every file and folder the run writes is listed in the folder's ``.soit-quickstart.json``;
``--overwrite`` removes those and nothing else, after the config and the overrides are
checked. A folder of an older version without that list is refused.

Usage: python tools/quickstart.py [--output-dir output/quickstart] [--overwrite] [key=value ...]
"""
import argparse
import fnmatch
import json
import math
import os
import sys
import time

from soit.config import add_trust_arguments

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
    add_trust_arguments(parser)
    return parser.parse_args(argv)


def draw_predictions(cfg, model, out_dir, score_threshold=0.2):
    """For each held-out image: the predicted masks (``*_pred.png``), the prediction beside the
    ground truth (``*_pred_gt.png``) and where the model looked for its best detection
    (``*_attention.png``, three panels: ``tools/visualize_attention.py``)."""
    import numpy as np
    import torch
    from detectron2.config import instantiate
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.utils.visualizer import ColorMode, Visualizer
    from PIL import Image

    from soit.visualize_attention import attention_around, draw_attention

    os.makedirs(out_dir, exist_ok=True)
    loader = instantiate(cfg.dataloader.test)
    name = cfg.dataloader.test.dataset.names
    metadata = MetadataCatalog.get(name)
    truth = {d["file_name"]: d for d in DatasetCatalog.get(name)}
    paths = []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            for inputs, outputs in zip(batch, model(batch)):
                inst = outputs["instances"].to("cpu")
                stem = os.path.join(out_dir, os.path.splitext(os.path.basename(inputs["file_name"]))[0])
                image = np.asarray(Image.open(inputs["file_name"]).convert("RGB"))
                vis = Visualizer(image, metadata, instance_mode=ColorMode.SEGMENTATION)
                drawn = vis.draw_instance_predictions(inst[inst.scores > score_threshold]).get_image()
                Image.fromarray(drawn).save(stem + "_pred.png")
                paths.append(stem + "_pred.png")
                if inputs["file_name"] in truth:
                    gt = Visualizer(image, metadata).draw_dataset_dict(truth[inputs["file_name"]]).get_image()
                    gap = np.full((drawn.shape[0], 8, 3), 255, dtype=np.uint8)
                    Image.fromarray(np.concatenate([drawn, gap, gt], 1)).save(stem + "_pred_gt.png")
                    paths.append(stem + "_pred_gt.png")
                picture = draw_best_attention(model, inputs, inst, metadata, draw_attention, attention_around)
                if picture is not None:
                    Image.fromarray(picture).save(stem + "_attention.png")
                    paths.append(stem + "_attention.png")
    return paths


def draw_best_attention(model, inputs, inst, metadata, draw_attention, attention_around):
    """Three panels for the best detection, seen in a window of the training input size
    around it (the quick-start model predicts in tiles of that size; the window's own best
    detection where none of its detections overlaps it), or None when the model found nothing."""
    if not len(inst):
        return None
    image = inputs["image"]  # the network input; detections are in the original size
    sy, sx = image.shape[-2] / inputs["height"], image.shape[-1] / inputs["width"]
    best = inst.pred_boxes.tensor[int(inst.scores.argmax())].tolist()
    box = [best[0] * sx, best[1] * sy, best[2] * sx, best[3] * sy]
    trained = getattr(model, "training_scale", None)
    size = trained.input_size if trained is not None and trained.input_size else tuple(image.shape[-2:])
    offset, found, entry = attention_around(model, image, box, size)
    if entry is None and found["detections"]:  # nothing in the window overlaps it: the window's best
        entry = found["detections"][0]
    if entry is None:
        return None
    x0, y0 = offset
    window = image[:, y0 : y0 + found["instances"].image_size[0], x0 : x0 + found["instances"].image_size[1]]
    window = window.permute(1, 2, 0).numpy()
    window = window[:, :, ::-1] if getattr(model, "input_format", "RGB") == "BGR" else window
    return draw_attention(window.copy(), entry, found["instances"], metadata)


# The marker says that a folder was written by the quick start; the manifest next to it lists
# every file and folder its run wrote (paths relative to the folder), checkpoints included:
# --overwrite removes exactly these and nothing else.
MARKER = ".soit-quickstart"
MANIFEST = ".soit-quickstart.json"
PICTURES = "vis"  # the folder of the pictures of the predicted masks
# names a run writes: a file of the user's by one of them would be overwritten, so it is refused
RUN_WRITES = (
    "config.yaml", "log.txt", "metrics.json", "eval_untrained.json", "eval_results.json", "last_checkpoint",
    "model_final.pth", "model_best.pth", "model_" + "[0-9]" * 7 + ".pth", f"{PICTURES}/*_pred.png",
    f"{PICTURES}/*_pred_gt.png", f"{PICTURES}/*_attention.png",
)  # fmt: skip


def snapshot(output_dir):
    """The relative paths of everything under ``output_dir`` (links listed, never followed)."""
    found = set()
    for folder, dirs, files in os.walk(output_dir):
        found.update(os.path.relpath(os.path.join(folder, name), output_dir) for name in dirs + files)
    return found


def read_manifest(output_dir):
    """``(files, folders)`` listed in the manifest; ``ValueError`` saying what is wrong with it."""
    path = os.path.join(output_dir, MANIFEST)
    what_to_do = "delete the folder yourself or choose another --output-dir. Nothing was changed."
    if not os.path.isfile(path):
        raise ValueError(
            f"{output_dir} holds a quick-start run without {MANIFEST}, the list of the files it wrote (an older "
            f"version kept none), and --overwrite removes only listed files: {what_to_do}"
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
        files, folders = manifest["files"], manifest["folders"]
        assert isinstance(files, list) and isinstance(folders, list)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise ValueError(f"{path} is not a quick-start manifest ({type(e).__name__}: {e}); {what_to_do}") from e
    for entry in files + folders:
        norm = os.path.normpath(entry) if isinstance(entry, str) and entry and not os.path.isabs(entry) else ".."
        if norm in (".", "..", MARKER, MANIFEST) or norm.startswith(".." + os.sep):
            raise ValueError(
                f"{path} lists {entry!r}, not a path inside {output_dir}: the quick start did not write this "
                f"manifest; {what_to_do}"
            )
    return [os.path.normpath(e) for e in files], [os.path.normpath(e) for e in folders]


def previous_run(output_dir, overwrite):
    """``(files, folders)``: what ``--overwrite`` removes from ``output_dir`` (a previous quick
    start's, as its manifest lists them); ``ValueError`` saying why the folder cannot be used."""
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"{output_dir} is not a folder; choose another --output-dir. Nothing was changed.")
    entries = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    if not entries:
        return [], []
    if MARKER not in entries:
        listed = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(
            f"{output_dir} is not empty and was not written by the quick start ({listed}); choose another "
            "--output-dir. Nothing was changed."
        )
    if not overwrite:
        raise ValueError(
            f"{output_dir} already holds a quick-start run; pass --overwrite to replace it (or --output-dir DIR)."
        )
    files, folders = read_manifest(output_dir)
    root = os.path.realpath(output_dir)
    files = [p for p in files if _removable(root, p, os.path.isfile)]
    folders = [p for p in folders if _removable(root, p, os.path.isdir)]
    kept = snapshot(output_dir) - set(files) - set(folders) - {MARKER, MANIFEST}
    # what the new run would write over, or through (a link where it writes its pictures)
    clash = [p for p in sorted(kept) if any(fnmatch.fnmatch(p, pattern) for pattern in RUN_WRITES)]
    clash += [PICTURES] if os.path.islink(os.path.join(output_dir, PICTURES)) else []
    if clash:
        raise ValueError(
            f"{output_dir} holds {', '.join(clash)}: not written by the quick start (not in {MANIFEST}, or a link), "
            "but a new run would write there; move it or choose another --output-dir. Nothing was changed."
        )
    return files, folders


def _removable(root, rel, is_kind):
    """Whether ``rel`` is of the kind ``is_kind`` tests and inside ``root`` (a real path), no
    link on the way or at the end."""
    path = os.path.join(root, rel)
    parent = os.path.dirname(path)
    return os.path.realpath(parent) == os.path.normpath(parent) and is_kind(path) and not os.path.islink(path)


def clear_previous_run(output_dir, overwrite):
    """None when ``output_dir`` may be used, the files and folders of the previous quick start
    it holds removed when ``overwrite`` (those listed in its manifest only: a listed path
    reached through a link, or a listed folder the user added files to, is left alone); else
    the message saying why not."""
    try:
        files, folders = previous_run(output_dir, overwrite)
    except ValueError as e:
        return str(e)
    if not os.path.isdir(output_dir):
        return None
    root = os.path.realpath(output_dir)
    for rel in files:
        if _removable(root, rel, os.path.isfile):  # checked again just before
            os.remove(os.path.join(root, rel))
    for rel in sorted(folders, key=lambda r: r.count(os.sep), reverse=True):  # the deepest first
        if _removable(root, rel, os.path.isdir) and not os.listdir(os.path.join(root, rel)):
            os.rmdir(os.path.join(root, rel))
    for name in (MANIFEST, MARKER):  # last: an interrupted removal can be repeated
        if os.path.isfile(os.path.join(root, name)):
            os.remove(os.path.join(root, name))
    kept = sorted(os.listdir(output_dir))
    if kept:
        print(f"[quickstart] --overwrite removed the previous run's files; kept what it did not write: {kept}")
    return None


def record_run(output_dir, before):
    """Write the manifest: everything under ``output_dir`` that was not in ``before`` (the
    :func:`snapshot` taken before the run), links excepted (the run writes none)."""
    new = snapshot(output_dir) - before - {MARKER, MANIFEST}
    paths = {p: os.path.join(output_dir, p) for p in sorted(new) if not os.path.islink(os.path.join(output_dir, p))}
    manifest = {
        "written_by": "tools/quickstart.py; --overwrite removes these files and folders (when empty), nothing else",
        "files": [p for p, full in paths.items() if os.path.isfile(full)],
        "folders": [p for p, full in paths.items() if os.path.isdir(full)],
    }
    partial = os.path.join(output_dir, MANIFEST + ".partial")
    with open(partial, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(partial, os.path.join(output_dir, MANIFEST))  # a crash never leaves half a manifest


def start_run(output_dir, before):
    """Mark ``output_dir`` as the quick start's and start its manifest."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, MARKER), "w") as f:
        f.write(f"written by tools/quickstart.py; --overwrite removes only the files listed in {MANIFEST}\n")
    record_run(output_dir, before)


def read_config(args):
    """The config with ``train.output_dir`` set to ``--output-dir`` and the command line's
    overrides applied; ``ValueError`` when an override moves the output elsewhere."""
    from soit.config import load_config

    # the quick-start configs register the nuclei dataset where SOIT_NUCLEI_ROOT says
    previous = os.environ.get("SOIT_NUCLEI_ROOT")
    os.environ["SOIT_NUCLEI_ROOT"] = args.data_root
    try:
        overrides = [f"train.output_dir={args.output_dir}", *args.opts]
        cfg = load_config(args.config_file, overrides, trust_config=args.trust_config, trust_pickle=args.trust_pickle)
    finally:
        if previous is None:
            del os.environ["SOIT_NUCLEI_ROOT"]
        else:
            os.environ["SOIT_NUCLEI_ROOT"] = previous
    if os.path.abspath(cfg.train.output_dir) != os.path.abspath(args.output_dir):
        # the marker, the manifest and the results are in --output-dir: the run must write there
        raise ValueError(
            f"the override train.output_dir={cfg.train.output_dir} differs from --output-dir {args.output_dir}: "
            "choose the quick start's folder with --output-dir alone"
        )
    return cfg


def main(argv=None):
    args = parse_args(argv)
    # everything that can be checked is, before a previous run is removed
    try:
        previous_run(args.output_dir, args.overwrite)
        cfg = read_config(args)
    except (KeyError, ValueError, FileNotFoundError) as e:  # the folder, the config or an override
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(message if "Nothing was changed." in message else f"{message}\nNothing was changed.")
        return 2

    from soit.data.nuclei import prepare_nuclei, register_nuclei
    from soit.engine import training

    prepare_nuclei(args.data_root)
    register_nuclei(args.data_root)
    try:
        for split in ("train", "test"):
            training.check_dataset(cfg, cfg.dataloader[split].dataset.get("names"))
    except ValueError as e:
        print(f"[quickstart] {e}\nNothing was changed.")
        return 2

    refused = clear_previous_run(args.output_dir, args.overwrite)  # checked again: the folder may have changed
    if refused:
        print(refused)
        return 2
    before = snapshot(args.output_dir) if os.path.isdir(args.output_dir) else set()
    start_run(args.output_dir, before)
    try:
        return run(args, cfg, record=lambda: record_run(args.output_dir, before))
    finally:  # a failed or interrupted run is recorded too, for the next --overwrite
        record_run(args.output_dir, before)


def run(args, cfg, record):
    """Baseline evaluation, training, pictures and ``metrics.json``; ``record()`` updates the
    manifest after each step."""
    from detectron2.config import instantiate
    from detectron2.engine import default_setup

    from soit.checkpoint.safe_load import SafeCheckpointer
    from soit.engine import training

    train_args = training.argument_parser().parse_args(
        ["--config-file", args.config_file] + (["--trust-pickle"] if args.trust_pickle else [])
    )
    default_setup(cfg, train_args)
    training.setup_soit_logger(args.output_dir)  # skipped images and dropped annotations into log.txt
    record()

    start = time.time()
    model = instantiate(cfg.model)
    print("[quickstart] evaluating the untrained model (baseline)", flush=True)
    untrained = training.do_test(cfg, model)
    os.rename(os.path.join(args.output_dir, "eval_results.json"), os.path.join(args.output_dir, "eval_untrained.json"))
    record()

    print(f"[quickstart] training for {cfg.train.max_iter} iterations on the CPU", flush=True)
    train_start = time.time()
    training.do_train(train_args, cfg)
    train_time = time.time() - train_start  # includes the final evaluation
    record()

    # the training loop's last hook evaluated the final weights on the held-out tile
    with open(os.path.join(args.output_dir, "eval_results.json")) as f:
        trained = json.load(f)
    model = instantiate(cfg.model)
    SafeCheckpointer(model, complete=True).load(os.path.join(args.output_dir, "model_final.pth"))
    pictures = draw_predictions(cfg, model, os.path.join(args.output_dir, PICTURES), args.vis_threshold)

    metrics = {
        "trained": trained,
        "untrained": untrained,
        "iterations": cfg.train.max_iter,
        "seconds": round(time.time() - start, 1),
        "train_seconds": round(train_time, 1),
        "checkpoint": os.path.join(args.output_dir, "model_final.pth"),
    }
    training.write_json(os.path.join(args.output_dir, "metrics.json"), metrics)
    print()
    for task in ("bbox", "segm"):
        print(f"[quickstart] {task} AP: {_ap(trained, task)} (untrained model: {_ap(untrained, task)})")
    print(f"[quickstart] metrics:     {os.path.join(args.output_dir, 'metrics.json')}")
    print(f"[quickstart] pictures:    {os.path.dirname(pictures[0]) if pictures else '(none)'}")
    print(f"[quickstart] checkpoint:  {metrics['checkpoint']}")
    print(
        "[quickstart] evaluate it again with: python train_net.py --eval-only --config-file "
        f"{os.path.relpath(args.config_file)} train.init_checkpoint={metrics['checkpoint']} "
        f"train.output_dir={args.output_dir}/eval"
    )
    return 0


def _ap(results, task):
    """The AP of ``task`` in ``results``, "n/a" when undefined (no ground truth)."""
    value = results.get(task, {}).get("AP")
    return f"{value:.1f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


if __name__ == "__main__":
    sys.exit(main())
