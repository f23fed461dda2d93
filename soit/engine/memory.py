"""Training memory of one SOIT step, measured on the device at hand (``tools/analyze_model.py
--tasks memory``).

What is measured and what is derived:

- **measured**: the allocator's peak during one forward + backward pass above what was
  allocated before it (activations kept for the backward pass, temporaries, the gradients,
  autocast's half-precision weight copies). On a GPU: ``torch.cuda.max_memory_allocated``.
  On the CPU: the profiler's record of every allocation and free (``profile_memory=True``),
  summed in time order;
- **derived**: the parameters (their tensors' sizes), the optimizer state (AdamW: two float32
  tensors per trainable parameter) and the total: parameters + optimizer state + the
  measured peak. Whether a GPU of a given size holds the run is derived from the total,
  with the margin stated by :func:`fits`.
"""
import time
from typing import Dict, List, Optional, Sequence

import torch

__all__ = [
    "synthetic_batch", "training_step_memory", "fits", "largest_relative_difference", "GPU_SIZES_GIB", "GPU_OVERHEAD",
]  # fmt: skip

GPU_SIZES_GIB = (8, 12, 16, 24, 40, 80)
# a GPU run also holds the CUDA context and kernels (about 0.5-1 GiB) and the caching
# allocator's unused blocks (fragmentation, commonly 10-25 % of the peak): assumed here
GPU_OVERHEAD = {"context_gib": 1.0, "fragmentation": 0.2}

_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def synthetic_batch(batch: int, height: int, width: int, num_objects: int, num_classes: int, seed: int = 0) -> List[Dict]:
    """``batch`` training inputs of ``height`` x ``width`` (uint8 noise), each with
    ``num_objects`` rectangular instances of random sizes and classes (boxes and masks)."""
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
        side = torch.rand(num_objects, 2, generator=g) * 0.25 * torch.tensor([width, height]) + 8
        corner = torch.rand(num_objects, 2, generator=g) * (torch.tensor([width, height]) - side)
        boxes = torch.cat([corner, corner + side], 1).round()
        masks = torch.zeros(num_objects, height, width, dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
            m[y0:y1, x0:x1] = True
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, num_classes, (num_objects,), generator=g)
        inst.gt_masks = BitMasks(masks)
        out.append({"image": image, "instances": inst, "height": height, "width": width})
    return out


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _cpu_peak(profile) -> int:
    """Peak of the running sum of the CPU allocations and frees a profile recorded."""
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in profile.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def training_step_memory(
    model: torch.nn.Module,
    batch: Sequence[Dict],
    precision: str = "fp32",
    seed: int = 0,
    keep_gradients: bool = False,
) -> Dict:
    """Memory and time of one training step of ``model`` (in training mode) on ``batch``.

    The step runs twice: once timed (also a warm-up), once measured; both from the same
    random state (dropout), so their gradients are the same.

    Returns:
        dict of bytes ``parameters``, ``gradients``, ``optimizer_state`` (AdamW, derived),
        ``step_peak`` (measured), ``total``; ``seconds`` (forward + backward, timed run),
        ``measured_on`` ("cpu profiler" or "cuda allocator") and, with ``keep_gradients``,
        ``grads`` (name -> tensor, on the CPU).
    """
    import logging

    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
    dtype = _DTYPES[precision]
    device = next(model.parameters()).device
    model.train()
    logging.getLogger("torch.profiler").setLevel(logging.ERROR)

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = model(list(batch))
        sum(losses.values()).backward()
        del losses

    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        peak, measured_on = torch.cuda.max_memory_allocated(device) - before, "cuda allocator"
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        peak, measured_on = _cpu_peak(prof), "cpu profiler"
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    out = {
        "parameters": _tensor_bytes(params),
        "gradients": _tensor_bytes(p.grad for p in trainable if p.grad is not None),
        "optimizer_state": 2 * sum(p.numel() * 4 for p in trainable),
        "step_peak": peak,
        "seconds": seconds,
        "measured_on": measured_on,
    }
    out["total"] = out["parameters"] + out["optimizer_state"] + out["step_peak"]
    if keep_gradients:
        out["grads"] = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def fits(total_bytes: int, gib: float, measured_on_gpu: bool = False) -> bool:
    """Whether a run of ``total_bytes`` fits a GPU of ``gib`` GiB: with the CUDA context and
    the allocator's fragmentation of :data:`GPU_OVERHEAD` added, unless the total was
    measured on a GPU already (then only the context)."""
    need = total_bytes / 2**30
    if not measured_on_gpu:
        need *= 1 + GPU_OVERHEAD["fragmentation"]
    return need + GPU_OVERHEAD["context_gib"] <= gib


def largest_relative_difference(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> Optional[float]:
    """max over parameters of max|a - b| / max|a| (None when the names differ)."""
    if a.keys() != b.keys():
        return None
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)
