"""Activation checkpointing: parts of SOIT keep only their inputs in training and run again
in the backward pass, trading about one more forward of each part for its activations'
memory (Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016;
``torch.utils.checkpoint``, non-reentrant). Same gradients as without (random states, e.g.
dropout's, are replayed); inference and export are unchanged.

Parts (``SOIT(activation_checkpointing=[...])``, ``model.activation_checkpointing`` in a config):

- ``backbone``: each stage of a detectron2 ResNet, or a timm backbone's own checkpointing;
- ``encoder``: each deformable encoder layer;
- ``mask_encoder``: each layer of the mask encoder (the encoder layer on P3);
- ``decoder``: each decoder layer;
- ``mask_head``: the instance-aware transformer of every instance (the largest activations
  per object: one full-resolution map per matched query).
"""
import contextlib
from typing import Sequence

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

__all__ = ["PARTS", "maybe_checkpoint", "set_activation_checkpointing"]

PARTS = ("backbone", "encoder", "mask_encoder", "decoder", "mask_head")


def maybe_checkpoint(enabled: bool, function, *args, **kwargs):
    """``function(*args, **kwargs)``, through non-reentrant checkpointing when ``enabled`` and
    gradients are being recorded."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    return function(*args, **kwargs)


@contextlib.contextmanager
def _statistics_kept(module: torch.nn.Module):
    """Batch norms in ``module`` normalise as usual but leave their running statistics as
    they are (the recomputation must not count a batch twice)."""
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


class _CheckpointedForward:
    """Stands in for one module's ``forward`` (an instance attribute, so the module's class,
    parameters and state-dict keys stay as they are): in training, the class's forward
    through checkpointing, its batch norms' statistics updated by the first run only. Holds
    the module itself, not a closure, so that a deep copy (the EMA's) runs its own weights."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        module, forward = self.module, type(self.module).forward
        if not (module.training and torch.is_grad_enabled()):
            return forward(module, *args, **kwargs)
        runs = []

        def run(*a, **k):
            if runs:  # the recomputation in the backward pass
                with _statistics_kept(module):
                    return forward(module, *a, **k)
            runs.append(1)
            return forward(module, *a, **k)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)


def _checkpoint_backbone(backbone: torch.nn.Module):
    body = getattr(backbone, "body", None)  # soit.modeling.backbone.TimmBackbone
    if body is not None and hasattr(body, "set_grad_checkpointing"):
        body.set_grad_checkpointing(True)
        return
    stages = getattr(backbone, "stages", None)  # detectron2's ResNet (and FoldedResNet's source)
    if isinstance(stages, (list, torch.nn.ModuleList)) and len(stages) > 0:
        for stage in stages:
            stage.forward = _CheckpointedForward(stage)
        return
    raise ValueError(
        f"activation_checkpointing 'backbone': {type(backbone).__name__} has neither ResNet stages nor timm's "
        "set_grad_checkpointing; leave 'backbone' out for this backbone"
    )


def check_parts(parts: Sequence[str]) -> tuple:
    if isinstance(parts, str):
        raise ValueError(f"activation_checkpointing takes a list of parts, got the string {parts!r}")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"activation_checkpointing: unknown part(s) {unknown}; choose from {list(PARTS)}")
    return tuple(p for p in PARTS if p in parts)


def set_activation_checkpointing(model, parts: Sequence[str]) -> tuple:
    """Switch checkpointing on for ``parts`` of a SOIT model (see the module docstring);
    returns the parts, checked."""
    parts = check_parts(parts)
    if "backbone" in parts:
        _checkpoint_backbone(model.backbone)
    model.transformer.encoder.checkpoint = "encoder" in parts
    model.transformer.decoder.checkpoint = "decoder" in parts
    model.mask_encoder.checkpoint = "mask_encoder" in parts
    model.mask_head.checkpoint = "mask_head" in parts
    return parts
