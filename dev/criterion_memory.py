#!/usr/bin/env python
"""Peak memory and time of SOIT's training losses (mask head on the matched queries, matching,
class/box/mask losses, with the autograd graph they keep for the backward pass), per config.

    python dev/criterion_memory.py
    python dev/criterion_memory.py --size 800 1333 --objects 50 --row paper \\
        --row hybrid_dn model.transformer.num_queries_one2many=1500 \\
            "model.denoising={_target_:soit.modeling.DenoisingQueries,num_classes:80,embed_dim:256}" \\
            model.criterion.extra_mask_loss_points=3136 model.criterion.extra_mask_loss_layers=1

Every row runs in a fresh process on one batch: an image of ``--size`` with ``--objects``
random boxes and masks, random weights. The network (backbone, transformer, heads) runs
first; then the process's resident-set peak is reset and the loss phase runs
(``soit.modeling.set_losses.SetLosses``). Its peak is reported as the growth over
the resident set before it, so that the rows differ only in what their losses keep. Large
allocations are served by mmap (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the
resident set at once and the figure follows the tensors alive. Linux only
(``/proc/self/clear_refs``).
"""
import argparse
import json
import os
import subprocess
import sys
import time

DEFAULT_CONFIG = "configs/soit_r50_50ep.py"
# with every row's defaults in the R-50 config (num_classes 80, embed_dim 256)
DN = "model.denoising={_target_:soit.modeling.DenoisingQueries,num_classes:80,embed_dim:256,groups:5}"
# hybrid matching (1500 one-to-many queries, 6 repeats) and 5 denoising groups, their masks at
# 3136 points on the last decoder layer (with full masks on every layer these groups predict
# 12x the paper's masks: 3600 full maps against 300 for 50 objects)
DEFAULT_ROWS = [
    ["paper"],
    [
        "hybrid_dn_points", "model.transformer.num_queries_one2many=1500", DN,
        "model.criterion.extra_mask_loss_points=3136", "model.criterion.extra_mask_loss_layers=1",
    ],
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="LazyConfig of the model (its `model`)")
    p.add_argument(
        "--row", action="append", nargs="+", metavar="NAME [KEY=VALUE ...]", default=None,
        help="a row: a name and config overrides (repeatable; default: the paper, and hybrid matching + "
        "denoising with their masks at points)",
    )
    p.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    p.add_argument("--objects", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default="", help="also write the rows to this file")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def synthetic_batch(height, width, objects, seed):
    """One training input: a random image with ``objects`` random boxes, each with a filled
    elliptical mask inside it."""
    import torch
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
    wh = torch.rand(objects, 2, generator=g) * torch.tensor([width / 4, height / 4]) + 8
    xy = torch.rand(objects, 2, generator=g) * (torch.tensor([width, height]) - wh)
    boxes = torch.cat([xy, xy + wh], 1)
    ys, xs = torch.arange(height)[:, None] + 0.5, torch.arange(width)[None] + 0.5
    masks = torch.zeros(objects, height, width, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        masks[i] = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
    inst = Instances((height, width))
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.randint(0, 80, (objects,), generator=g)
    inst.gt_masks = BitMasks(masks)
    return [{"image": image, "height": height, "width": width, "instances": inst}]


def measure(config, overrides, size, objects, seed):
    """The loss phase's peak growth (MiB) and seconds, and the number of masks it predicts."""
    import torch
    from detectron2.config import instantiate

    from soit.config import load_config
    from soit.modeling.set_losses import prepare_targets

    torch.manual_seed(seed)
    cfg = load_config(config, overrides)
    if cfg.model.get("num_classes", 80) < 80:
        cfg.model.num_classes = 80  # the synthetic objects take COCO's 80 classes
    model = instantiate(cfg.model).train()
    batch = synthetic_batch(*size, objects, seed)
    images, padding = model.preprocess_image(batch)
    targets = prepare_targets(batch, images.image_sizes, images.tensor.shape[-2:], model.device)
    dn = model.denoising(targets) if model.denoising is not None else None
    outputs, mask_inputs = model.run_heads(batch, images, padding, dn)
    # masks predicted with a graph, on the full map or at points (not the gradient-free maps
    # that choose the points)
    counted = []

    def counting(method):
        def run(feats, padding, params, *args, **kwargs):
            if torch.is_grad_enabled():
                counted.append(params.shape[0])
            return method(feats, padding, params, *args, **kwargs)

        return run

    model.mask_head.forward = counting(model.mask_head.forward)
    model.mask_head.forward_at_points = counting(model.mask_head.forward_at_points)
    before = _kib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    losses = model.set_losses()(outputs, mask_inputs, targets, dn)
    total = sum(losses.values())
    seconds = time.perf_counter() - start
    peak = _kib("VmHWM")
    if not torch.isfinite(total):
        raise RuntimeError(f"the losses are not finite: {total}")
    return {"peak_mib": (peak - before) / 1024, "seconds": seconds, "masks": sum(counted), "losses": len(losses)}


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        row = json.loads(args.child)
        print(json.dumps(measure(args.config, row[1:], args.size, args.objects, args.seed)))
        return 0
    if not os.path.exists("/proc/self/clear_refs"):
        sys.exit("criterion_memory: needs Linux's /proc/self/clear_refs to reset the peak resident set")
    rows = args.row or DEFAULT_ROWS
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    results = []
    for row in rows:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(row), "--config", args.config,
               "--size", *map(str, args.size), "--objects", str(args.objects), "--seed", str(args.seed),
               "--threads", str(args.threads)]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"criterion_memory: row {row[0]!r} failed:\n{done.stderr[-3000:]}")
        results.append({"row": row[0], "overrides": row[1:], **json.loads(done.stdout.strip().splitlines()[-1])})
        print(f"{row[0]}: {results[-1]['peak_mib']:.0f} MiB, {results[-1]['seconds']:.1f} s", file=sys.stderr)
    base = results[0]["peak_mib"]
    print(f"\nLoss phase at {args.size[0]}x{args.size[1]}, {args.objects} objects, {args.config}:\n")
    print("| row | masks predicted | peak memory (MiB) | x first row | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['row']} | {r['masks']} | {r['peak_mib']:.0f} | {r['peak_mib'] / base:.2f} | {r['seconds']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "objects": args.objects, "config": args.config, "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
