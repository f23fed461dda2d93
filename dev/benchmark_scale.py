#!/usr/bin/env python
"""Scale benchmark: SOIT's default inference on magnifications and crops nobody tuned for,
against an oracle that knows the best magnification and against Mask R-CNN with detectron2's
test-time augmentation.

    python dev/benchmark_scale.py --dataset nuclei --seeds 0 1 2 --seconds 300 --save-models
    python dev/benchmark_scale.py --dataset nuclei --load-models output/benchmark_scale/models

Test cases are drawn, not chosen: ``--num-factors`` magnifications of the held-out image(s),
log-uniform in [0.5, 2] from ``--factor-seed`` (predicted, then scored at the original size
against the original ground truth), and the held-out image(s) cut into non-overlapping
crops of the training input size and of half of it (a test set of their own, written under
``--output``). Per seed, the quick-start SOIT and Mask R-CNN R-18-FPN train for the same
budget on the same data (``dev/benchmark_small_data.py``), then on every case:

- SOIT as its config ships it (``model.auto_scale``; the model knows its training inputs
  through ``record_training_scale``), with the factors it chose and the looks it took;
- the oracle: the same weights predicting at one factor (``model.test_scales=[f]``, tiled
  as the default), for every factor of ``--oracle-factors``; the best segm AP is kept;
- Mask R-CNN with ``GeneralizedRCNNWithTTA`` (``--tta-min-sizes``, flips) and without.

Also the wall time of SOIT's default inference against one plain pass on the held-out image.
Writes ``results.md`` (the tables), ``results.json`` (every seed's figures) and ``log.txt``
to ``--output``. No detection at all scores 0 AP. On a 2-core CPU, with the defaults, a seed
takes the two training budgets plus about 10 minutes for SOIT's cases (mostly the oracle's
sweep) and 15-20 for Mask R-CNN's (mostly TTA: ten passes of up to 1024 x 1024 per test
image). Run it on a machine doing nothing else: the training budgets are wall time, and
another job changes both the iterations trained and the times measured.
"""
import argparse
import copy
import gc
import importlib.util
import json
import logging
import math
import os
import shlex
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the other dev/ modules
from bench_timing import median_times  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
logger = logging.getLogger("soit.benchmark_scale")


def _small_data_module():
    """dev/benchmark_small_data.py (a script, not a package), imported by path."""
    name = "soit_dev_benchmark_small_data"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "benchmark_small_data.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


bsd = _small_data_module()
# 0.25 to 4 in 12 steps of 2^(1/3): every factor of that range lies within 12% of a swept one
DEFAULT_ORACLE = [round(0.25 * 16 ** (i / 12), 4) for i in range(13)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("nuclei", "hela"), default="nuclei", help="the shipped split")
    p.add_argument("--data-root", default=None, help="where the split is prepared (default datasets/<dataset>)")
    p.add_argument("--soit-config", default=bsd.DEFAULT_CONFIG)
    p.add_argument("--soit-override", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the SOIT config")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seconds", type=float, default=300.0, help="training budget per model and seed")
    p.add_argument("--max-iter", type=int, default=0, help="train this many iterations instead of --seconds")
    p.add_argument("--num-factors", type=int, default=8, help="magnifications drawn")
    p.add_argument("--factor-seed", type=int, default=0, help="seed of the drawn magnifications")
    p.add_argument(
        "--crop-size", type=int, default=0,
        help="side of the large crops (default: the config's training crop, else the measured training input size)",
    )  # fmt: skip
    p.add_argument("--oracle-factors", type=float, nargs="+", default=DEFAULT_ORACLE, help="the oracle's sweep")
    p.add_argument("--tta-min-sizes", type=int, nargs="+", default=[256, 384, 512, 768, 1024])
    p.add_argument("--tta-max-size", type=int, default=2048)
    p.add_argument("--no-tta-flip", action="store_true", help="Mask R-CNN's TTA without horizontal flips")
    p.add_argument("--timing-repeats", type=int, default=5, help="timed runs per inference (median)")
    p.add_argument("--mask-rcnn-lr", type=float, default=2e-4)
    p.add_argument("--mask-rcnn-rois", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default="output/benchmark_scale")
    models = p.add_mutually_exclusive_group()
    models.add_argument(
        "--save-models", action="store_true", help="write each seed's weights to <output>/models (for --load-models)"
    )
    models.add_argument(
        "--load-models", metavar="DIR",
        help="evaluate the weights --save-models wrote to DIR (soit_seed<S>.pth, mask_rcnn_seed<S>.pth), no training",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.command = shlex.join(["python", "dev/benchmark_scale.py", *(sys.argv[1:] if argv is None else argv)])
    if not os.path.isfile(args.soit_config):
        p.error(f"--soit-config {args.soit_config!r} does not exist")
    if [o for o in args.soit_override if "=" not in o]:
        p.error(f"--soit-override takes KEY=VALUE, got {args.soit_override}")
    if args.num_factors < 1 or args.timing_repeats < 1 or min(args.oracle_factors) <= 0:
        p.error("--num-factors and --timing-repeats must be >= 1 and --oracle-factors positive")
    if args.load_models:
        missing = [p for s in args.seeds for p in model_paths(args.load_models, s).values() if not os.path.isfile(p)]
        if missing:
            p.error(f"--load-models: {missing} missing; write them with --save-models")
    elif args.seconds <= 0 and args.max_iter <= 0:
        p.error("give a training budget (--seconds or --max-iter) or trained weights (--load-models)")
    return args


def model_paths(folder, seed):
    return {name: os.path.join(folder, f"{name}_seed{seed}.pth") for name in ("soit", "mask_rcnn")}


def draw_factors(num, seed, low=0.5, high=2.0):
    """``num`` magnifications log-uniform in [low, high], increasing, to 3 decimals."""
    rng = np.random.default_rng(seed)
    return sorted(round(float(f), 3) for f in np.exp(rng.uniform(math.log(low), math.log(high), num)))


# ---------------------------------------------------------------- test cases
def crop_size_of(cfg, args):
    """``--crop-size``, else the training crop of the config, else the measured input size."""
    from detectron2.config import instantiate
    from detectron2.data import transforms as T

    from soit.modeling.object_scale import measure_training_scale

    if args.crop_size:
        return args.crop_size
    for aug in instantiate(cfg.dataloader.train.mapper.augmentation):
        if isinstance(aug, T.RandomCrop) and aug.crop_type == "absolute":
            return int(max(aug.crop_size))
    scale = measure_training_scale(instantiate(cfg.dataloader.train.mapper), instantiate(cfg.dataloader.train.dataset))
    if scale is None or scale.input_size is None:
        raise ValueError("the training inputs have no single size (no fixed crop): give the crop size with --crop-size")
    return int(max(scale.input_size))


def _decode(segmentation, h, w):
    from pycocotools import mask as mask_util

    if isinstance(segmentation, list):  # polygons
        rle = mask_util.merge(mask_util.frPyObjects(segmentation, h, w))
    elif isinstance(segmentation["counts"], list):  # uncompressed RLE
        rle = mask_util.frPyObjects(segmentation, h, w)
    else:
        rle = segmentation
    return mask_util.decode(rle).astype(bool)


def write_crops(dataset_name, size, folder):
    """Cut every image of a registered COCO dataset into non-overlapping ``size`` x ``size``
    crops (the remainder at the right and bottom is left out) with their ground truth
    (instances left empty by the crop dropped); writes ``folder/crops.json`` and the PNGs.
    Returns (json path, image folder, number of crops)."""
    from detectron2.data import MetadataCatalog
    from PIL import Image
    from pycocotools import mask as mask_util

    meta = MetadataCatalog.get(dataset_name)
    with open(meta.json_file) as f:
        coco = json.load(f)
    os.makedirs(folder, exist_ok=True)
    images, annotations = [], []
    for img in coco["images"]:
        pixels = np.asarray(Image.open(os.path.join(meta.image_root, img["file_name"])))
        h, w = pixels.shape[:2]
        anns = [(a, _decode(a["segmentation"], h, w)) for a in coco["annotations"] if a["image_id"] == img["id"]]
        stem = os.path.splitext(os.path.basename(img["file_name"]))[0]
        for y in range(0, h - size + 1, size):
            for x in range(0, w - size + 1, size):
                name = f"{stem}_y{y}_x{x}.png"
                Image.fromarray(pixels[y : y + size, x : x + size]).save(os.path.join(folder, name))
                images.append({"id": len(images) + 1, "file_name": name, "height": size, "width": size})
                for a, mask in anns:
                    part = np.asfortranarray(mask[y : y + size, x : x + size].astype(np.uint8))
                    if not part.any():
                        continue
                    rle = mask_util.encode(part)
                    rle["counts"] = rle["counts"].decode()
                    annotations.append({
                        "id": len(annotations) + 1, "image_id": images[-1]["id"], "category_id": a["category_id"],
                        "segmentation": rle, "bbox": mask_util.toBbox(rle).tolist(), "area": float(part.sum()),
                        "iscrowd": a.get("iscrowd", 0),
                    })  # fmt: skip
    if not images:
        raise ValueError(f"every image of {dataset_name} is smaller than {size} x {size}: give a smaller --crop-size")
    path = os.path.join(folder, "crops.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": coco["categories"]}, f)
    return path, folder, len(images)


def make_cases(args, crop_size):
    """The drawn magnifications and the crop test sets (registered), in table order."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    num_test = len(bsd._test_dicts())
    cases = [
        {"name": f"{f:g}x", "kind": "magnification", "factor": f, "dataset": bsd.TEST_NAME, "images": num_test}
        for f in draw_factors(args.num_factors, args.factor_seed)
    ]
    for size in (crop_size, crop_size // 2):
        name = f"benchmark_scale_crop{size}"
        json_file, image_root, count = write_crops(bsd.TEST_NAME, size, os.path.join(args.output, "crops", str(size)))
        if name in DatasetCatalog.list():  # an earlier run in this process: its files may lie elsewhere
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, json_file, image_root)
        cases.append({"name": f"crop {size}", "kind": "crop", "size": size, "dataset": name, "images": count})
    return cases


# ---------------------------------------------------------------- evaluation
class ScaleRecorder(torch.nn.Module):
    """The model, keeping each image's ``"scale"`` record of its default inference."""

    def __init__(self, model):
        super().__init__()
        self.model, self.records = model, []

    def forward(self, batched_inputs):
        outputs = self.model(batched_inputs)
        self.records += [o.get("scale") for o in outputs]
        return outputs


def score(model, mapper, case, device):
    """{"bbox", "segm"} AP of one case and the seconds it took (inference and scoring); no
    detection (NaN) or an input too small for the model scores 0."""
    from soit.modeling.transformer import TooFewTokensError

    start = time.perf_counter()
    try:
        ap = bsd.evaluate(model, mapper, device, case["dataset"])
    except TooFewTokensError as e:
        logger.warning(f"{case['name']}: too small for the model ({e}); scored 0")
        ap = {"bbox": 0.0, "segm": 0.0, "error": str(e)[:200]}
    ap = {task: (0.0 if v != v else v) for task, v in ap.items()}
    return {**ap, "seconds": round(time.perf_counter() - start, 2)}


def soit_case(model, mapper, case, args):
    """SOIT's default inference and the oracle sweep on one case."""
    recorder = ScaleRecorder(model)
    default = score(recorder, mapper, case, args.device)
    records = [r for r in recorder.records if r is not None]
    default["factors"] = [round(r["factor"], 4) for r in records]
    default["looks"] = [[round(f, 4) for f in r["looks"]] for r in records]
    default["notes"] = sorted({r["note"] for r in records if r["note"]})
    # compute in passes at the case's image size: a look at factor f costs about f^2
    default["compute"] = statistics.mean(sum(f * f for f in looks) for looks in default["looks"]) if records else 1.0
    saved = model.auto_scale, model.test_scales
    sweep = {}
    try:
        model.auto_scale = False
        for f in args.oracle_factors:
            model.test_scales = (float(f),)
            sweep[f"{f:g}"] = score(model, mapper, case, args.device)
    finally:
        model.auto_scale, model.test_scales = saved
    oracle = {"sweep": sweep}
    for task in ("bbox", "segm"):
        best = max(sweep, key=lambda f: sweep[f][task])
        oracle[task], oracle[f"{task}_factor"] = sweep[best][task], float(best)
    return {"default": default, "oracle": oracle}


def tta_model(model, num_classes, args):
    """detectron2's ``GeneralizedRCNNWithTTA`` around a trained Mask R-CNN: the old-style
    config it reads, built from detectron2's defaults and the model's own test settings."""
    from detectron2.config import get_cfg
    from detectron2.modeling import GeneralizedRCNNWithTTA

    cfg = get_cfg()
    cfg.MODEL.MASK_ON, cfg.MODEL.KEYPOINT_ON, cfg.MODEL.LOAD_PROPOSALS = True, False, False
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = model.roi_heads.box_predictor.test_nms_thresh
    cfg.TEST.DETECTIONS_PER_IMAGE = model.roi_heads.box_predictor.test_topk_per_image
    cfg.INPUT.FORMAT = model.input_format
    cfg.TEST.AUG.MIN_SIZES = tuple(args.tta_min_sizes)
    cfg.TEST.AUG.MAX_SIZE = args.tta_max_size
    cfg.TEST.AUG.FLIP = not args.no_tta_flip
    return GeneralizedRCNNWithTTA(cfg, model)


def soit_timing(model, mapper, args):
    """SOIT's default inference against one plain pass (no scale choice, same tiling) on the
    first held-out image at its own size."""
    x = mapper(copy.deepcopy(bsd._test_dicts()[0]))
    default = model.auto_scale, model.test_scales
    model.to(args.device).eval()

    def run(auto_scale, test_scales):
        model.auto_scale, model.test_scales = auto_scale, test_scales
        model([copy.copy(x)])

    calls = {"default_s": lambda: run(*default), "plain_s": lambda: run(False, (1.0,))}
    try:
        with torch.no_grad():
            t = {name: round(m, 3) for name, (m, _) in median_times(calls, args.timing_repeats, 1, args.device).items()}
    finally:
        model.auto_scale, model.test_scales = default
    return {**t, "ratio": round(t["default_s"] / t["plain_s"], 2)}


# ---------------------------------------------------------------- one seed
def run_seed(seed, cases, classes, args):
    from soit.checkpoint.safe_load import SafeCheckpointer
    from soit.engine.training import record_training_scale

    paths = model_paths(args.load_models or os.path.join(args.output, "models"), seed)
    overrides = list(args.soit_override) + ([f"train.init_checkpoint={paths['soit']}"] if args.load_models else [])
    row = {"name": "soit", "config": args.soit_config, "overrides": overrides}
    budget = args.seconds, args.max_iter
    out = {"seed": seed, "soit_iterations": 0, "mask_rcnn_iterations": 0, "cases": {c["name"]: {} for c in cases}}

    model, loader, optimizer, clip, soit_mapper = bsd.soit_setup(row, len(classes), seed, bool(args.load_models))
    if model.training_scale is None:  # trained here (or weights without the record): measure it
        cfg = bsd.load_soit_config(row, seed)
        cfg.dataloader.train.dataset.names = bsd.TRAIN_NAME
        record_training_scale(cfg, [model])
    if not args.load_models:
        logger.info(f"seed {seed}: training SOIT")
        out["soit_iterations"], _ = bsd.train(model, loader, optimizer, clip, args.device, *budget)
    out["training_scale"] = model.training_scale.to_dict() if model.training_scale else None
    if args.save_models:  # the layout SafeCheckpointer reads, the record of the training inputs included
        os.makedirs(os.path.dirname(paths["soit"]), exist_ok=True)
        torch.save({"model": model.state_dict(), "training_scale": out["training_scale"] or {}}, paths["soit"])
    for case in cases:
        out["cases"][case["name"]].update(soit_case(model, soit_mapper(case.get("factor", 1.0)), case, args))
        logger.info(f"seed {seed}, {case['name']}: SOIT {out['cases'][case['name']]['default']}")
    out["timing"] = soit_timing(model, soit_mapper(1.0), args)
    del model, loader, optimizer
    gc.collect()

    cfg = bsd.load_soit_config(row, seed)  # the data pipeline of the SOIT config, as in benchmark_small_data
    model, loader, optimizer, clip, rcnn_mapper = bsd.mask_rcnn_setup(
        cfg.dataloader.train.mapper.augmentation, len(classes), seed, args.mask_rcnn_lr,
        cfg.dataloader.train.total_batch_size, args.mask_rcnn_rois,
    )  # fmt: skip
    if args.load_models:
        SafeCheckpointer(model, complete=True).load(paths["mask_rcnn"])
    else:
        logger.info(f"seed {seed}: training Mask R-CNN")
        out["mask_rcnn_iterations"], _ = bsd.train(model, loader, optimizer, clip, args.device, *budget)
    if args.save_models:
        torch.save({"model": model.state_dict()}, paths["mask_rcnn"])
    tta = tta_model(model, len(classes), args)
    for case in cases:
        mapper = rcnn_mapper(case.get("factor", 1.0))
        result = out["cases"][case["name"]]
        result["mask_rcnn"] = score(model, mapper, case, args.device)
        result["mask_rcnn_tta"] = score(tta, mapper, case, args.device)
        logger.info(f"seed {seed}, {case['name']}: Mask R-CNN {result['mask_rcnn']}, TTA {result['mask_rcnn_tta']}")
    return out


# ---------------------------------------------------------------- tables
def case_table(task, cases, runs):
    """Markdown rows of one task ("bbox" or "segm"): one row per case."""
    factor_cols = " default factor (per seed) | looks (passes) |" if task == "segm" else ""
    lines = [
        f"| case | images | SOIT default |{factor_cols} min default / oracle | oracle | oracle factor (per seed) "
        "| Mask R-CNN + TTA | Mask R-CNN | >= 0.9x oracle, every seed | default >= Mask R-CNN + TTA (mean) |",
    ]
    lines.append("|" + " --- |" * (lines[0].count("|") - 1))
    for case in cases:
        rs = [r["cases"][case["name"]] for r in runs]
        default, oracle = [r["default"][task] for r in rs], [r["oracle"][task] for r in rs]
        tta, plain = [r["mask_rcnn_tta"][task] for r in rs], [r["mask_rcnn"][task] for r in rs]
        ratios = [d / o for d, o in zip(default, oracle) if o > 0]
        meets = all(d >= 0.9 * o for d, o in zip(default, oracle))
        beats = statistics.mean(default) >= statistics.mean(tta)
        cells = [case["name"], str(case["images"]), bsd.mean_std(default)]
        if task == "segm":
            chosen = [statistics.median(r["default"]["factors"] or [float("nan")]) for r in rs]
            compute = statistics.mean(r["default"]["compute"] for r in rs)
            cells += ["/".join(f"{f:.2f}" for f in chosen), f"{compute:.2f}"]
        cells += [f"{min(ratios):.2f}" if ratios else "n/a", bsd.mean_std(oracle)]
        cells += ["/".join(f"{r['oracle'][task + '_factor']:g}" for r in rs), bsd.mean_std(tta), bsd.mean_std(plain)]
        cells += ["yes" if meets else "no", "yes" if beats else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report(args, cases, runs):
    def joined(values, fmt):
        return ", ".join(format(v, fmt) for v in values)

    per_case = [[r["cases"][c["name"]] for r in runs] for c in cases]
    met = [all(x["default"]["segm"] >= 0.9 * x["oracle"]["segm"] for x in rs) for rs in per_case]
    factors = joined([c["factor"] for c in cases if c["kind"] == "magnification"], "g")
    crops = ", ".join(f"{c['size']} px ({c['images']} images)" for c in cases if c["kind"] == "crop")
    soit_t = {k: [r["timing"][k] for r in runs] for k in ("default_s", "plain_s", "ratio")}
    spent = {  # evaluation seconds per seed, all cases
        k: [sum(sum(e["seconds"] for e in pick(c)) for c in r["cases"].values()) for r in runs]
        for k, pick in (
            ("default", lambda c: [c["default"]]), ("oracle", lambda c: c["oracle"]["sweep"].values()),
            ("mask_rcnn", lambda c: [c["mask_rcnn"]]), ("mask_rcnn_tta", lambda c: [c["mask_rcnn_tta"]]),
        )
    }  # fmt: skip
    out = [
        f"## Scale benchmark, {args.dataset}", "", "```", args.command, "```", "",
        f"Magnifications drawn (factor seed {args.factor_seed}): {factors}; crops: {crops}. Seeds {args.seeds}; "
        f"oracle factors {joined(args.oracle_factors, 'g')}; Mask R-CNN TTA shortest sides "
        f"{tuple(args.tta_min_sizes)}, max {args.tta_max_size}, flip {not args.no_tta_flip}.", "",
        "Segm AP, mean ± standard deviation over seeds (default factor: median over a case's images; looks: mean "
        "compute of the default in passes at the case's image size, the sum of its looks' squared factors):", "",
        *case_table("segm", cases, runs), "",
        "Box AP (the oracle's best factor for boxes, chosen on boxes):", "", *case_table("bbox", cases, runs), "",
        f"Within 0.9x of the oracle's segm AP in every seed: {sum(met)} of {len(cases)} cases.", "",
        f"Wall time on the held-out image at its own size (median of {args.timing_repeats} runs; per seed): SOIT "
        f"default {joined(soit_t['default_s'], '.2f')} s against one plain pass (same tiling) "
        f"{joined(soit_t['plain_s'], '.2f')} s ({joined(soit_t['ratio'], '.2f')}x). Evaluating every case "
        f"(inference and COCO scoring, per seed): SOIT default {joined(spent['default'], '.0f')} s, the oracle's "
        f"sweep {joined(spent['oracle'], '.0f')} s, Mask R-CNN with TTA {joined(spent['mask_rcnn_tta'], '.0f')} s, "
        f"without {joined(spent['mask_rcnn'], '.0f')} s.",
    ]  # fmt: skip
    return "\n".join(out)


def main(argv=None):
    args = parse_args(argv)
    bsd.setup_log(args.output)
    logger.info(args.command)
    args.train_json = None  # benchmark_small_data's shipped splits
    classes = bsd.register_data(args)
    cfg = bsd.load_soit_config({"config": args.soit_config, "overrides": args.soit_override})
    cfg.dataloader.train.dataset.names = bsd.TRAIN_NAME
    cases = make_cases(args, crop_size_of(cfg, args))
    print(f"magnifications (factor seed {args.factor_seed}): {[c['factor'] for c in cases if 'factor' in c]}")
    print(f"crops: {[(c['size'], c['images']) for c in cases if c['kind'] == 'crop']}", flush=True)
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(seed, cases, classes, args))
        with open(os.path.join(args.output, "results.json"), "w") as f:
            json.dump({"command": args.command, "dataset": args.dataset, "cases": cases, "runs": runs}, f, indent=2)
    bsd.write_report(args.output, report(args, cases, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
