#!/usr/bin/env python
"""Small-data benchmark: SOIT configs beside detectron2's Mask R-CNN R-18-FPN, trained on
the same split with the same data pipeline and the same wall-clock budget, for several
seeds, evaluated with COCOEvaluator on a held-out set (optionally at other test scales).

    python dev/benchmark_small_data.py --seconds 300 --seeds 0 1 2 --test-scales 0.5 1 2
    python dev/benchmark_small_data.py --soit paper=configs/quickstart/soit_nuclei_cpu.py \\
        --soit tiled=configs/quickstart/soit_nuclei_cpu.py model.tile_size=256
    python dev/benchmark_small_data.py --dataset hela --seconds 300
    python dev/benchmark_small_data.py --train-json a.json --train-images imgs/ \\
        --test-json b.json --test-images imgs/ --seconds 600

Every model trains from scratch (no pretrained weights) on the CPU by default. The data
pipeline (the augmentation list of the training mapper) is the first SOIT config's; Mask
R-CNN gets the same augmentations through detectron2's ``DatasetMapper``. The learning rate
drops x0.1 after 85% of the budget for every model. With ``--max-iter N`` each model trains
N iterations instead (no time budget). Prints markdown tables (mean and standard deviation
over seeds; every seed at every test scale) and writes them with all figures to ``--output``.
"""
import argparse
import ast
import copy
import gc
import json
import logging
import os
import random
import statistics
import sys
import time

import numpy as np
import torch

DEFAULT_CONFIG = "configs/quickstart/soit_nuclei_cpu.py"
TRAIN_NAME, TEST_NAME = "benchmark_train", "benchmark_test"
logger = logging.getLogger("soit.benchmark_small_data")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--soit", action="append", nargs="+", metavar="NAME=CONFIG [KEY=VALUE ...]", default=None,
        help=f"a SOIT row: a name, its LazyConfig and overrides (repeatable; default soit={DEFAULT_CONFIG})",
    )
    p.add_argument(
        "--inference", action="append", nargs="+", metavar="NAME KEY=VALUE", default=[],
        help="also evaluate every trained SOIT model with these model attributes changed, as row "
        "'<soit row>/NAME' (repeatable), e.g. --inference tiled tile_size=256 tile_overlap=64",
    )
    p.add_argument("--no-mask-rcnn", action="store_true", help="leave out the Mask R-CNN R-18-FPN row")
    p.add_argument("--mask-rcnn-lr", type=float, default=2e-4, help="AdamW learning rate of Mask R-CNN")
    p.add_argument(
        "--mask-rcnn-rois", type=int, default=128,
        help="RoIs sampled per image for Mask R-CNN's heads (detectron2's tutorial value for small datasets; "
        "the COCO default 512 costs about 4x the time per step on the CPU)",
    )
    p.add_argument(
        "--seconds", type=float, default=300.0,
        help="training wall-clock budget per model and seed; 0: no training, SOIT rows start from their "
        "train.init_checkpoint (to evaluate a trained model at other scales and inference settings; "
        "'{seed}' in an override is replaced by the seed, e.g. train.init_checkpoint=models/x_seed{seed}.pth)",
    )
    p.add_argument("--max-iter", type=int, default=0, help="train this many iterations instead of --seconds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--test-scales", type=float, nargs="+", default=[1.0], help="test images resized by these factors")
    p.add_argument("--train-json"), p.add_argument("--train-images")
    p.add_argument("--test-json"), p.add_argument("--test-images")
    p.add_argument(
        "--dataset", choices=("nuclei", "hela"), default="nuclei",
        help="a shipped split when no --train-json is given: the quick-start nuclei or HeLa nuclei",
    )
    p.add_argument("--data-root", default=None, help="where the shipped split is prepared (default datasets/<dataset>)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default="output/benchmark_small_data", help="folder for results.json and the log")
    p.add_argument(
        "--save-models", action="store_true",
        help="also write each trained SOIT model to <output>/models/<row>_seed<seed>.pth "
        "(re-evaluate it with --seconds 0 and train.init_checkpoint=<that file>)",
    )
    args = p.parse_args(argv)
    if bool(args.train_json) != bool(args.test_json) or bool(args.train_json) != bool(args.train_images):
        p.error("--train-json, --train-images, --test-json and --test-images go together")
    if args.train_json and not args.test_images:
        p.error("--test-images is needed with --test-json")
    rows = []
    for spec in args.soit or [[f"soit={DEFAULT_CONFIG}"]]:
        name, sep, config = spec[0].partition("=")
        if not sep or not name or not config:
            p.error(f"--soit takes NAME=CONFIG first, got {spec[0]!r}")
        if not os.path.isfile(config):
            p.error(f"--soit {name}: config file {config!r} does not exist")
        bad = [o for o in spec[1:] if "=" not in o]
        if bad:
            p.error(f"--soit {name}: overrides must be KEY=VALUE, got {bad}")
        rows.append({"name": name, "config": config, "overrides": spec[1:]})
    if len({r["name"] for r in rows}) != len(rows) or (not args.no_mask_rcnn and "mask_rcnn" in [r["name"] for r in rows]):
        p.error("row names must be unique (mask_rcnn is taken by the Mask R-CNN row)")
    args.rows = rows
    args.evaluate_only = args.seconds <= 0 and args.max_iter <= 0
    if args.evaluate_only and not args.no_mask_rcnn:
        p.error("--seconds 0 evaluates trained SOIT checkpoints only: add --no-mask-rcnn")
    args.inference_settings = {}
    for spec in args.inference:
        settings = {}
        for item in spec[1:]:
            key, sep, value = item.partition("=")
            if not sep:
                p.error(f"--inference {spec[0]}: settings must be KEY=VALUE, got {item!r}")
            try:
                settings[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                settings[key] = value
        args.inference_settings[spec[0]] = settings
    return args


def apply_settings(model, settings):
    """Set inference attributes of a trained SOIT model (only attributes it has)."""
    for key, value in settings.items():
        if not hasattr(model, key):
            raise ValueError(f"--inference: the model has no attribute {key!r}")
        setattr(model, key, value)


def register_data(args):
    """Register the train/test split; returns the class names."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    if args.train_json:
        for path in (args.train_json, args.test_json):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"annotation file {path!r} does not exist")
        files = [(TRAIN_NAME, args.train_json, args.train_images), (TEST_NAME, args.test_json, args.test_images)]
    else:
        from soit.data.hela import prepare_hela
        from soit.data.nuclei import prepare_nuclei

        prepare = {"nuclei": prepare_nuclei, "hela": prepare_hela}[args.dataset]
        out = prepare(args.data_root or os.path.join("datasets", args.dataset))
        files = [(TRAIN_NAME, out["train_json"], out["image_root"]), (TEST_NAME, out["val_json"], out["image_root"])]
    for name, json_file, image_root in files:
        register_coco_instances(name, {}, json_file, image_root)
        DatasetCatalog.get(name)  # fills thing_classes
    train_classes = MetadataCatalog.get(TRAIN_NAME).thing_classes
    if MetadataCatalog.get(TEST_NAME).thing_classes != train_classes:
        raise ValueError("the train and test annotation files have different categories")
    return train_classes


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_soit_config(row, seed=0):
    """A SOIT row's config; "{seed}" in an override is ``seed`` (train.init_checkpoint=models/x_seed{seed}.pth)."""
    from soit.config import load_config

    return load_config(row["config"], [o.replace("{seed}", str(seed)) for o in row["overrides"]])


def soit_setup(row, num_classes, seed, evaluate_only=False):
    """(model, train loader, optimizer, clip norm, test mapper factory) of a SOIT row."""
    from detectron2.config import instantiate
    from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
    from detectron2.data.samplers import TrainingSampler

    cfg = load_soit_config(row, seed)
    cfg.model.num_classes = num_classes
    seed_all(seed)
    model = instantiate(cfg.model)
    mapper = instantiate(cfg.dataloader.train.mapper)
    dataset = get_detection_dataset_dicts(TRAIN_NAME, filter_empty=False)
    loader = build_detection_train_loader(
        dataset=dataset, mapper=mapper, sampler=TrainingSampler(len(dataset), seed=seed),
        total_batch_size=cfg.dataloader.train.total_batch_size, aspect_ratio_grouping=False, num_workers=0,
    )  # fmt: skip
    if not cfg.train.init_checkpoint and evaluate_only:
        raise ValueError(f"--seconds 0: SOIT row {row['name']!r} needs train.init_checkpoint=<trained weights>")
    if cfg.train.init_checkpoint:
        from soit.checkpoint.safe_load import SafeCheckpointer

        SafeCheckpointer(model, complete=evaluate_only).load(cfg.train.init_checkpoint)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    test_mapper_cfg = cfg.dataloader.test.mapper

    def test_mapper(scale):
        from soit.data.augmentation import ScaleBy

        mapper = instantiate(test_mapper_cfg)
        mapper.augmentation = type(mapper.augmentation)([ScaleBy(scale), *mapper.augmentation.augs])
        return mapper

    return model, loader, optimizer, cfg.train.clip_grad_norm, test_mapper


def mask_rcnn_setup(augmentation_cfg, num_classes, seed, lr, batch_size, rois=128):
    """detectron2's model-zoo Mask R-CNN FPN with a ResNet-18 (BN, from scratch)."""
    from detectron2 import model_zoo
    from detectron2.config import instantiate
    from detectron2.data import DatasetMapper, build_detection_train_loader, get_detection_dataset_dicts
    from detectron2.data.samplers import TrainingSampler

    cfg = model_zoo.get_config("common/models/mask_rcnn_fpn.py")
    bottom_up = cfg.model.backbone.bottom_up
    bottom_up.stem.norm = "BN"
    bottom_up.stages.depth = 18
    del bottom_up.stages["stride_in_1x1"]  # basic blocks have no 1x1 convolution
    bottom_up.stages.norm = "BN"
    bottom_up.freeze_at = 0
    cfg.model.roi_heads.num_classes = num_classes
    cfg.model.roi_heads.batch_size_per_image = rois
    seed_all(seed)
    model = instantiate(cfg.model)
    augs = [instantiate(a) for a in augmentation_cfg]
    mapper = DatasetMapper(
        is_train=True, augmentations=augs, image_format="BGR", use_instance_mask=True, instance_mask_format="bitmask"
    )
    dataset = get_detection_dataset_dicts(TRAIN_NAME, filter_empty=False)
    loader = build_detection_train_loader(
        dataset=dataset, mapper=mapper, sampler=TrainingSampler(len(dataset), seed=seed),
        total_batch_size=batch_size, aspect_ratio_grouping=False, num_workers=0,
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)

    def test_mapper(scale):
        from soit.data.augmentation import ScaleBy

        return DatasetMapper(is_train=False, augmentations=[ScaleBy(scale)], image_format="BGR")

    return model, loader, optimizer, 0.0, test_mapper


def train(model, loader, optimizer, clip, device, seconds, max_iter):
    """Train until the budget is spent; lr x0.1 after 85% of it. Returns (iterations, seconds)."""
    from detectron2.utils.events import EventStorage

    from soit.engine import SOITTrainer

    model.to(device).train()
    trainer = SOITTrainer(model, loader, optimizer, clip_grad_norm=clip)
    base = [g["lr"] for g in optimizer.param_groups]
    start = time.perf_counter()
    it = 0
    with EventStorage(0) as storage:
        trainer.storage = storage
        while True:
            elapsed = time.perf_counter() - start
            frac = it / max_iter if max_iter else (elapsed / seconds if seconds > 0 else 1.0)
            if frac >= 1:
                break
            for group, lr in zip(optimizer.param_groups, base):
                group["lr"] = lr * (0.1 if frac >= 0.85 else 1.0)
            storage.iter = trainer.iter = it
            trainer.run_step()
            it += 1
            if it % 50 == 0:
                losses = {k: v.latest() for k, v in storage.histories().items() if "loss" in k}
                logger.info(f"  iter {it}: {elapsed:.0f}s, total_loss {sum(losses.values()):.3f}")
    return it, time.perf_counter() - start


def evaluate(model, mapper, device, dataset_name=TEST_NAME):
    """bbox and segm AP on a registered test set, the test split by default (NaN when the
    model detected nothing)."""
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset

    model.to(device).eval()
    loader = build_detection_test_loader(dataset=_test_dicts(dataset_name), mapper=mapper, num_workers=0)
    # both tasks named: a model without detections yet would otherwise be scored on boxes only
    evaluator = COCOEvaluator(dataset_name, tasks=("bbox", "segm"), use_fast_impl=False, max_dets_per_image=100)
    with torch.no_grad():
        res = inference_on_dataset(model, loader, evaluator)
    return {task: round(float(res[task]["AP"]), 2) for task in ("bbox", "segm")}


def _test_dicts(dataset_name=TEST_NAME):
    from detectron2.data import get_detection_dataset_dicts

    return get_detection_dataset_dicts(dataset_name, filter_empty=False)


def mean_std(values):
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f}"


def tables(results, scales, seeds):
    lines = ["| model | iterations | s/iter | bbox AP | segm AP |", "| --- | --- | --- | --- | --- |"]
    main_scale = 1.0 if 1.0 in scales else scales[0]
    for name, runs in results.items():
        its = [r["iterations"] for r in runs]
        spi = [r["seconds"] / max(1, r["iterations"]) for r in runs]
        ap = {t: [r["ap"][str(main_scale)][t] for r in runs] for t in ("bbox", "segm")}
        lines.append(
            f"| {name} | {statistics.mean(its):.0f} | {statistics.mean(spi):.2f} | {mean_std(ap['bbox'])} | {mean_std(ap['segm'])} |"
        )
    out = [f"Test scale {main_scale:g}x, mean ± standard deviation over seeds {seeds}:", "", *lines]
    if len(scales) > 1:
        header = " | ".join(f"{s:g}x bbox / segm" for s in scales)
        out += ["", "Every seed at every test scale (AP):", "", f"| model | seed | {header} |",
                "| --- | --- | " + " | ".join("---" for _ in scales) + " |"]  # fmt: skip
        for name, runs in results.items():
            for r in runs:
                cells = " | ".join(f"{r['ap'][str(s)]['bbox']:.1f} / {r['ap'][str(s)]['segm']:.1f}" for s in scales)
                out.append(f"| {name} | {r['seed']} | {cells} |")
    return "\n".join(out)


def setup_log(output):
    """The benchmark's log in ``output``/log.txt, the libraries' chatter left out."""
    from detectron2.utils.logger import setup_logger

    os.makedirs(output, exist_ok=True)
    setup_logger(os.path.join(output, "log.txt"), name="soit")
    # per-image notes of the mapper (annotations lost to crops) would drown the log
    for noisy in ("detectron2", "d2", "fvcore", "soit.data"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv=None):
    args = parse_args(argv)
    setup_log(args.output)
    classes = register_data(args)
    logger.info(f"data: {len(classes)} classes; rows: {[r['name'] for r in args.rows]}; seeds {args.seeds}")

    results = {}
    order = ([] if args.no_mask_rcnn else ["mask_rcnn"]) + [r["name"] for r in args.rows]
    # the data pipeline of every row, Mask R-CNN included, is the first SOIT config's
    first = load_soit_config(args.rows[0], args.seeds[0])
    augmentation_cfg = first.dataloader.train.mapper.augmentation
    batch_size = first.dataloader.train.total_batch_size
    for name in order:
        results[name] = []
        for seed in args.seeds:
            gc.collect()
            if name == "mask_rcnn":
                model, loader, optimizer, clip, test_mapper = mask_rcnn_setup(
                    augmentation_cfg, len(classes), seed, args.mask_rcnn_lr, batch_size, args.mask_rcnn_rois
                )
            else:
                row = next(r for r in args.rows if r["name"] == name)
                model, loader, optimizer, clip, test_mapper = soit_setup(row, len(classes), seed, args.evaluate_only)
            logger.info(f"{name}, seed {seed}: training")
            iterations, seconds = train(model, loader, optimizer, clip, args.device, args.seconds, args.max_iter)
            ap = {}
            for scale in args.test_scales:
                ap[str(scale)] = evaluate(model, test_mapper(scale), args.device)
                logger.info(f"{name}, seed {seed}, test scale {scale:g}: {ap[str(scale)]}")
            results[name].append({"seed": seed, "iterations": iterations, "seconds": round(seconds, 1), "ap": ap})
            if args.save_models and name != "mask_rcnn" and not args.evaluate_only:
                path = os.path.join(args.output, "models", f"{name}_seed{seed}.pth")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                # the layout DetectionCheckpointer reads: train.init_checkpoint=<path> re-evaluates it
                torch.save({"model": model.state_dict()}, path)
                logger.info(f"{name}, seed {seed}: weights saved to {path}")
            for inf_name, settings in ({} if name == "mask_rcnn" else args.inference_settings).items():
                variant = copy.deepcopy(model)
                apply_settings(variant, settings)
                ap = {}
                for scale in args.test_scales:
                    ap[str(scale)] = evaluate(variant, test_mapper(scale), args.device)
                    logger.info(f"{name}/{inf_name}, seed {seed}, test scale {scale:g}: {ap[str(scale)]}")
                entry = {"seed": seed, "iterations": iterations, "seconds": round(seconds, 1), "ap": ap}
                results.setdefault(f"{name}/{inf_name}", []).append(entry)
                del variant
            with open(os.path.join(args.output, "results.json"), "w") as f:
                json.dump({"args": {k: v for k, v in vars(args).items()}, "results": results}, f, indent=2)
    write_report(args.output, tables(results, args.test_scales, args.seeds))
    return 0


def write_report(output, text):
    """Print the tables and write them to ``output/results.md``."""
    print(text)
    with open(os.path.join(output, "results.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
