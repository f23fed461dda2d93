"""CPU inference of detectron2's ResNet with its frozen batch norms folded into the
convolutions, in channels-last layout.

A frozen batch norm (or an evaluating one) after a convolution is an affine map per output channel,
``y = conv(x) * s + t`` with ``s = weight / sqrt(running_var + eps)`` and
``t = bias - running_mean * s``; it equals one convolution with weights ``W * s`` and bias
``t`` (plus ``b * s`` when the convolution has a bias ``b``). The folded weights are computed
from the module's current tensors at every call (about 24 M multiplications for R-50, a few
milliseconds), so loading other weights can never leave a stale copy behind.
Channels-last (NHWC) activations let oneDNN run every convolution without reordering its
input and output. The results equal ``ResNet.forward`` up to float rounding; figures in
docs/benchmarks.md.

Only the structures written by detectron2's ``build_resnet_backbone`` /
``ResNet.make_default_stages`` are folded: ``BasicStem``, ``BasicBlock`` and
``BottleneckBlock`` whose convolutions are detectron2 ``Conv2d`` layers normalised by
``FrozenBatchNorm2d``, by a ``BatchNorm2d`` in eval mode (its running statistics), or by
nothing. Anything else (deformable blocks, other norms, a BatchNorm2d in training mode, a
classification head, forward hooks) runs the backbone's own forward.
"""

from typing import Dict

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet
from torch import nn

from soit.layers.cpu_inference import fast_cpu_inference

__all__ = ["can_fold", "folded_resnet_forward", "maybe_folded_forward"]


def _norm_foldable(norm) -> bool:
    if norm is None or type(norm) is FrozenBatchNorm2d:
        return True
    # an evaluating BatchNorm2d normalises with its running statistics: the same affine map
    return type(norm) is nn.BatchNorm2d and not norm.training and norm.running_mean is not None


def _conv_foldable(conv) -> bool:
    return (
        type(conv) is Conv2d
        and _norm_foldable(conv.norm)
        and not conv._forward_hooks
        and not conv._forward_pre_hooks
        and not (conv.norm is not None and (conv.norm._forward_hooks or conv.norm._forward_pre_hooks))
    )


def _block_convs(block):
    if type(block) is BottleneckBlock:
        convs = [block.conv1, block.conv2, block.conv3]
    elif type(block) is BasicBlock:
        convs = [block.conv1, block.conv2]
    else:
        return None
    return convs + ([block.shortcut] if block.shortcut is not None else [])


def can_fold(backbone) -> bool:
    """True when ``backbone`` is a detectron2 ``ResNet`` made only of the parts this module
    folds (see the module docstring) and carries no forward hooks."""
    if type(backbone) is not ResNet or backbone.num_classes is not None:
        return False
    if type(backbone.stem) is not BasicStem or not _conv_foldable(backbone.stem.conv1):
        return False
    modules = [backbone, backbone.stem, *backbone.stages]
    for stage in backbone.stages:
        for block in stage:
            convs = _block_convs(block)
            if convs is None or not all(_conv_foldable(c) for c in convs):
                return False
            modules.append(block)
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _conv(conv, x, relu: bool):
    """``conv(x)`` (then ReLU) with its frozen batch norm folded into the weights."""
    weight, bias = conv.weight, conv.bias
    norm = conv.norm
    if norm is not None:
        scale = (norm.running_var + norm.eps).rsqrt()
        if norm.weight is not None:  # None: a BatchNorm2d without affine parameters
            scale = norm.weight * scale
        shift = -norm.running_mean * scale
        if norm.bias is not None:
            shift = norm.bias + shift
        weight = weight * scale.to(weight.dtype)[:, None, None, None]
        bias = shift if bias is None else bias * scale + shift
        bias = bias.to(weight.dtype)
    out = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if conv.activation is not None:
        out = conv.activation(out)
    return F.relu_(out) if relu else out


def _block(block, x):
    out = _conv(block.conv1, x, relu=True)
    if type(block) is BottleneckBlock:
        out = _conv(block.conv2, out, relu=True)
        out = _conv(block.conv3, out, relu=False)
    else:
        out = _conv(block.conv2, out, relu=False)
    shortcut = x if block.shortcut is None else _conv(block.shortcut, x, relu=False)
    return F.relu_(out.add_(shortcut))


def folded_resnet_forward(backbone: ResNet, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``backbone(x)`` with folded batch norms, in channels-last layout (the returned
    features are channels-last tensors of the same shapes and values). ``backbone`` must
    pass :func:`can_fold`.

    Args:
        x: (N, C, H, W).

    Returns:
        {name: (N, C_name, H_name, W_name)} for ``backbone``'s output features.
    """
    if x.dim() != 4:
        raise ValueError(f"ResNet takes an input of shape (N, C, H, W), got {tuple(x.shape)}")
    wanted = backbone._out_features
    outputs = {}
    x = x.contiguous(memory_format=torch.channels_last)
    x = _conv(backbone.stem.conv1, x, relu=True)
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    if "stem" in wanted:
        outputs["stem"] = x
    for name, stage in zip(backbone.stage_names, backbone.stages):
        for block in stage:
            x = _block(block, x)
        if name in wanted:
            outputs[name] = x
    return outputs


def maybe_folded_forward(backbone, x: torch.Tensor):
    """``backbone(x)``, through :func:`folded_resnet_forward` where CPU inference allows it
    (:func:`soit.layers.cpu_inference.fast_cpu_inference`) and the backbone can be folded."""
    if fast_cpu_inference(x) and can_fold(backbone):
        return folded_resnet_forward(backbone, x)
    return backbone(x)
