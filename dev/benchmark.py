#!/usr/bin/env python
"""Speed and memory of SOIT R-50 beside its peers, measured in one run on the same inputs.

    python dev/benchmark.py --device cuda --markdown                 # the GPU figures
    python dev/benchmark.py --device cpu --runs 3 --throughput-batch 0 --train-precisions fp32

Models (random weights; the counts of work match trained models, see below):
    soit          configs/models/soit_r50.py (300 queries, top-100 masks)
    soit_pytorch_attn
                  the same model with its deformable attention on the PyTorch (grid_sample)
                  path, as under force_pytorch() or without soit._C; not in the default list
    soit_plain    the same model under soit.layers.cpu_inference.plain_inference(): linear
                  layers as F.linear, the backbone's own forward with separate batch norms,
                  the attention's locations and the mask head's sampling composed (the faster
                  CPU inference formulations off); not in the default list
    mask_rcnn     detectron2's model-zoo Mask R-CNN R50-FPN (common/models/mask_rcnn_fpn.py)
    deformable    Hugging Face transformers' Deformable DETR, R-50, two-stage + box refinement
                  (only where transformers is installed; its row says so otherwise)

Measured: inference latency at batch 1 (median of --runs calls after --warmup, the models'
calls taking turns, CUDA-synced, post-processing to the original size included), throughput
at --throughput-batch images per call, peak GPU memory of inference; one training iteration
at --train-batch images (forward, backward, AdamW step) per precision (fp32, fp16 with
GradScaler, bf16 autocast) with its peak memory; with --stages, SOIT's time per stage.

Random weights need care to give fair figures: the backbones' FrozenBN layers start at
identity statistics, under which a deep random ResNet overflows; their statistics are set
from one forward pass of the benchmark image first. Mask R-CNN's box score threshold is set
so that --rcnn-candidates (class, box) pairs per image pass it (a trained model passes a few
thousand at its 0.05 threshold), not 80,000 as a threshold of 0 on uniform random scores
would.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the other dev/ modules
from bench_timing import median_time, median_times  # noqa: E402

MODELS = ("soit", "soit_pytorch_attn", "soit_plain", "mask_rcnn", "deformable")
DEFAULT_MODELS = ("soit", "mask_rcnn", "deformable")
PRECISIONS = ("fp32", "fp16", "bf16")


# ------------------------------------------------------------------------------ helpers
def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device, fn):
    """Peak GPU memory (MiB) allocated while ``fn`` runs; None on the CPU (not run there)."""
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def calibrate_frozen_bn(model, run):
    """Set the statistics of every frozen batch norm (detectron2's FrozenBatchNorm2d,
    transformers' copies of it) from its input during one call of ``run``, in data-flow
    order (each layer sees inputs already normalised upstream). Returns how many."""
    import torch

    def set_stats(module, args):
        x = args[0].detach().float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    frozen = [m for m in model.modules() if type(m).__name__.endswith("FrozenBatchNorm2d")]
    handles = [m.register_forward_pre_hook(set_stats) for m in frozen]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return len(frozen)


def synthetic_instances(h, w, n, num_classes, device, seed):
    """``n`` rectangles with their masks, detectron2 style."""
    import torch
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, generator=g) * w * 0.7
    y0 = torch.rand(n, generator=g) * h * 0.7
    bw = (torch.rand(n, generator=g) * 0.25 + 0.05) * w
    bh = (torch.rand(n, generator=g) * 0.25 + 0.05) * h
    boxes = torch.stack([x0, y0, (x0 + bw).clamp(max=w), (y0 + bh).clamp(max=h)], 1)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i, (a, b, c, d) in enumerate(boxes.round().long().tolist()):
        masks[i, b:d, a:c] = True
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
    inst.gt_masks = BitMasks(masks)
    return inst.to(device)


# ------------------------------------------------------------------------------- models
class Detectron2Runner:
    """A detectron2-style model (list of dicts in)."""

    def __init__(self, name, model, image, device):
        self.name, self.model, self.device = name, model.to(device), device
        self.h, self.w = image.shape[1:]
        self.image = image.to(device)
        self.num_classes = getattr(model, "num_classes", None) or model.roi_heads.num_classes

    def inputs(self, batch, with_targets=False):
        out = []
        for i in range(batch):
            x = {"image": self.image, "height": self.h, "width": self.w}
            if with_targets:
                x["instances"] = synthetic_instances(self.h, self.w, 10, self.num_classes, self.device, seed=i)
            out.append(x)
        return out

    def infer(self, batch):
        import torch

        self.model.eval()
        inputs = self.inputs(batch)
        with torch.inference_mode():
            return self.model(inputs)

    def train_loss(self, batch):
        self.model.train()
        losses = self.model(self.inputs(batch, with_targets=True))
        return sum(losses.values())


class PyTorchAttentionRunner(Detectron2Runner):
    """A SOIT runner whose calls run under force_pytorch(): the deformable attention takes the
    PyTorch path wherever soit._C would run it."""

    def infer(self, batch):
        from soit.layers.ms_deform_attn import force_pytorch

        with force_pytorch():
            return super().infer(batch)

    def train_loss(self, batch):
        from soit.layers.ms_deform_attn import force_pytorch

        with force_pytorch():
            return super().train_loss(batch)


class PlainInferenceRunner(Detectron2Runner):
    """A SOIT runner whose inference runs under plain_inference() (F.linear everywhere, the
    backbone's batch norms as separate passes, no fused soit._C entries)."""

    def infer(self, batch):
        from soit.layers.cpu_inference import plain_inference

        with plain_inference():
            return super().infer(batch)


def build_soit(image, device, name="soit"):
    from detectron2.config import instantiate

    from soit.model_zoo import get_config

    cfg = get_config("models/soit_r50.py")
    runner_class = {"soit_pytorch_attn": PyTorchAttentionRunner, "soit_plain": PlainInferenceRunner}.get(
        name, Detectron2Runner
    )
    runner = runner_class(name, instantiate(cfg.model), image, device)
    calibrate_frozen_bn(runner.model, lambda: runner.infer(1))
    return runner


def build_mask_rcnn(image, device, candidates):
    import torch
    from detectron2 import model_zoo
    from detectron2.config import instantiate

    cfg = model_zoo.get_config("common/models/mask_rcnn_fpn.py")
    runner = Detectron2Runner("mask_rcnn", instantiate(cfg.model), image, device)
    calibrate_frozen_bn(runner.model, lambda: runner.infer(1))
    predictor = runner.model.roi_heads.box_predictor
    probs = []
    original = predictor.predict_probs
    predictor.predict_probs = lambda *a: probs.extend(original(*a)) or original(*a)
    predictor.test_score_thresh = 0.0
    try:
        runner.infer(1)
    finally:
        predictor.predict_probs = original
    scores = probs[0][:, :-1].flatten()  # without the background column
    k = min(candidates, scores.numel())
    predictor.test_score_thresh = float(torch.topk(scores, k).values[-1])
    return runner


class HFDeformableRunner:
    """transformers' DeformableDetrForObjectDetection (pixel_values / pixel_mask in)."""

    name = "deformable"

    def __init__(self, image, device):
        import torch
        from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

        config = DeformableDetrConfig(two_stage=True, with_box_refine=True, use_pretrained_backbone=False)
        self.model = DeformableDetrForObjectDetection(config).to(device)
        self.device = device
        mean = torch.tensor([123.675, 116.28, 103.53], device=device).view(3, 1, 1)
        std = torch.tensor([58.395, 57.12, 57.375], device=device).view(3, 1, 1)
        self.pixels = ((image.to(device).float() - mean) / std)[None]
        self.h, self.w = image.shape[1:]
        calibrate_frozen_bn(self.model, lambda: self.infer(1))

    def infer(self, batch):
        import torch

        self.model.eval()
        pixels = self.pixels.expand(batch, -1, -1, -1)
        with torch.inference_mode():
            out = self.model(pixel_values=pixels, pixel_mask=torch.ones_like(pixels[:, 0], dtype=torch.long))
            # the post-processing a user runs: top-100 (query, class) pairs, boxes to pixels
            scores, index = out.logits.sigmoid().flatten(1).topk(100, dim=1)
            boxes = out.pred_boxes.gather(1, (index // out.logits.shape[-1])[..., None].expand(-1, -1, 4))
            return scores, boxes * torch.tensor([self.w, self.h, self.w, self.h], device=self.device)

    def train_loss(self, batch):
        import torch

        self.model.train()
        labels = []
        for i in range(batch):
            inst = synthetic_instances(self.h, self.w, 10, self.model.config.num_labels, self.device, seed=i)
            b = inst.gt_boxes.tensor / torch.tensor([self.w, self.h, self.w, self.h], device=self.device)
            cxcywh = torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1)
            labels.append({"class_labels": inst.gt_classes, "boxes": cxcywh})
        pixels = self.pixels.expand(batch, -1, -1, -1)
        return self.model(pixel_values=pixels, labels=labels).loss


# ---------------------------------------------------------------------------- measuring
SOIT_STAGES = ("backbone", "neck", "encoder", "decoder", "mask_encoder", "mask_head", "postprocess")


def soit_stage_times(runner, device, runs):
    """Mean seconds per stage of ``runs`` batch-1 SOIT calls, from forward hooks on the neck,
    the encoder, the decoder, the mask encoder and the mask head. The backbone's time is taken
    from the model's entry to the neck (input normalisation included) so that no hook sits on
    the backbone itself (a hooked backbone runs its own forward: see folded_resnet)."""
    model = runner.model
    parts = {
        "neck": model.neck,
        "encoder": model.transformer.encoder,
        "decoder": model.transformer.decoder,
        "mask_encoder": model.mask_encoder,
        "mask_head": model.mask_head,
    }
    totals = dict.fromkeys(SOIT_STAGES, 0.0)
    start = {}

    def now():
        sync(device)
        return time.perf_counter()

    def begin(name):
        return lambda *_: start.__setitem__(name, now())

    def end(name):
        return lambda *_: totals.__setitem__(name, totals[name] + now() - start[name])

    handles = [model.register_forward_pre_hook(begin("model"))]
    def backbone_done(*_):
        totals["backbone"] += now() - start["model"]

    handles.append(model.neck.register_forward_pre_hook(backbone_done))
    for name, module in parts.items():
        handles += [module.register_forward_pre_hook(begin(name)), module.register_forward_hook(end(name))]
    from soit.modeling import meta_arch

    postprocess = meta_arch.detections_at_output_size  # what SOIT.inference calls per image

    def timed_postprocess(*a, **k):
        t = now()
        out = postprocess(*a, **k)
        totals["postprocess"] += now() - t
        return out

    meta_arch.detections_at_output_size = timed_postprocess
    try:
        runner.infer(1)
        totals = dict.fromkeys(SOIT_STAGES, 0.0)
        total = 0.0
        for _ in range(runs):
            t = now()
            runner.infer(1)
            total += now() - t
    finally:
        meta_arch.detections_at_output_size = postprocess
        for h in handles:
            h.remove()
    out = {k: v / runs for k, v in totals.items()}
    out["other"] = total / runs - sum(out.values())
    out["total"] = total / runs
    return out


def measure(runner, device, args):
    """Throughput, inference memory and training figures of one runner (latency: see
    :func:`interleaved_latency`)."""
    import torch

    from detectron2.utils.events import EventStorage

    row = {"model": runner.name}
    row["inference_peak_mib"] = peak_memory(device, lambda: runner.infer(1))
    if args.throughput_batch:
        b = args.throughput_batch
        row["throughput_img_s"] = b / median_time(lambda: runner.infer(b), max(1, args.runs // 5), 1, device)[0]
    params = [p for p in runner.model.parameters() if p.requires_grad]
    state = {k: v.clone() for k, v in runner.model.state_dict().items()}
    for precision in args.train_precisions:
        if precision == "fp16" and device.type != "cuda":
            row[f"train_{precision}_ms"] = None
            continue
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

        def step():
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = runner.train_loss(args.train_batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{runner.name}: non-finite {precision} training loss {loss.item()}")

        with EventStorage():  # detectron2's models log training statistics there
            row[f"train_{precision}_ms"] = 1e3 * median_time(step, args.train_runs, 1, device)[0]
            row[f"train_{precision}_peak_mib"] = peak_memory(device, step)
        runner.model.load_state_dict(state)  # every precision starts from the same weights
    runner.model.eval()
    return row


def fmt(v, digits=1):
    return "-" if v is None else f"{v:,.{digits}f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_MODELS),
        help=f"any of {', '.join(MODELS)} (default: {' '.join(DEFAULT_MODELS)})",
    )
    parser.add_argument("--size", nargs=2, type=int, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--runs", type=int, default=50, help="timed inference calls (median)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--throughput-batch", type=int, default=8, help="images per call for throughput (0: skip)")
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--train-runs", type=int, default=10)
    parser.add_argument(
        "--train-precisions", nargs="*", default=None, help="fp32 fp16 bf16 (default: all on a GPU, fp32 on the CPU; none: skip)"
    )
    parser.add_argument("--rcnn-candidates", type=int, default=2000, help="(class, box) pairs Mask R-CNN keeps per image")
    parser.add_argument(
        "--stages", type=int, default=0, metavar="N",
        help="also the SOIT rows' time per stage (mean of N calls after 1, forward hooks); 0: skip",
    )  # fmt: skip
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.device not in ("auto", "cuda", "cpu"):
        parser.error(f"--device must be auto, cuda or cpu, got {args.device!r}")
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.train_precisions is None:  # bf16 on a CPU without bf16 units takes minutes a step
        args.train_precisions = list(PRECISIONS) if device.type == "cuda" else ["fp32"]
    unknown = [m for m in args.models if m not in MODELS] + [p for p in args.train_precisions if p not in PRECISIONS]
    if unknown:
        parser.error(f"unknown --models / --train-precisions {unknown}")
    torch.manual_seed(0)
    h, w = args.size
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    runners = []
    for name in args.models:
        torch.manual_seed(0)
        if name in ("soit", "soit_pytorch_attn", "soit_plain"):
            runner = build_soit(image, device, name)
        elif name == "mask_rcnn":
            runner = build_mask_rcnn(image, device, args.rcnn_candidates)
        else:
            try:
                runner = HFDeformableRunner(image, device)
            except ImportError as e:
                print(f"deformable: skipped, transformers is not installed ({e})")
                continue
        runners.append(runner)
    # batch-1 latency, the runners taking turns: their ratio holds on a loaded machine
    calls = {runner.name: (lambda r=runner: r.infer(1)) for runner in runners}
    latency = {name: t for name, (t, _) in median_times(calls, args.runs, args.warmup, device).items()}
    rows = []
    for runner in runners:
        rows.append({"latency_ms": 1e3 * latency[runner.name], **measure(runner, device, args)})

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"{name}, torch {torch.__version__}, {h}x{w}, latency: median of {args.runs} after {args.warmup} warm-up, "
        "the models' calls taking turns"
    )
    cols = ["latency_ms", "throughput_img_s", "inference_peak_mib"]
    for p in args.train_precisions:
        cols += [f"train_{p}_ms", f"train_{p}_peak_mib"]
    cols = [c for c in cols if any(c in r for r in rows)]
    if args.markdown:
        print("| model | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for r in rows:
            print(f"| {r['model']} | " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    else:
        for r in rows:
            print(f"{r['model']:<12} " + "  ".join(f"{c} {fmt(r.get(c))}" for c in cols))
    soit = next((r for r in rows if r["model"] == "soit"), None)
    for r in rows:
        if soit is not None and r is not soit:
            ratio = r["latency_ms"] / soit["latency_ms"]
            print(f"SOIT latency vs {r['model']}: {ratio:.2f}x ({'faster' if ratio > 1 else 'slower'})")
    stage_rows = {
        r.name: soit_stage_times(r, device, args.stages) for r in runners if args.stages and r.name.startswith("soit")
    }
    if stage_rows:
        print(f"\nSOIT stage times (s, mean of {args.stages} calls):")
        print("| stage | " + " | ".join(stage_rows) + " |")
        print("|---|" + "---:|" * len(stage_rows))
        for stage in (*SOIT_STAGES, "other", "total"):
            print(f"| {stage} | " + " | ".join(f"{t[stage]:.3f}" for t in stage_rows.values()) + " |")
    if args.json:
        with open(args.json, "w") as f:
            result = {"device": name, "torch": torch.__version__, "size": [h, w], "rows": rows, "stages": stage_rows}
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
