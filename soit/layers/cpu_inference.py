"""Faster CPU inference that keeps the results up to float rounding.

Without gradients on the CPU (``torch.no_grad`` / ``torch.inference_mode``, eager, not
tracing or exporting), parts of the model take a faster formulation of the same arithmetic:

* linear layers run as one oneDNN call with the bias (and a following ReLU) applied on the
  way out (:func:`linear`). ATen's CPU ``addmm`` first copies the broadcast bias into the
  whole output and then accumulates the product onto it: at the encoder's 22,000 tokens
  that copy and the separate ReLU pass cost about as much as a fifth of the products.
* ResNet backbones run with every frozen batch norm folded into its convolution's weights
  and in channels-last layout (``soit.modeling.backbone.folded_resnet``): no separate
  normalisation pass, and oneDNN's convolutions without layout reorders.
* the deformable attention's sampling locations and the mask head's sampling are formed
  inside ``soit._C`` (``soit.layers.ms_deform_attn.dispatch``: ``offsets_kernel``,
  ``mask_head_kernel``).

Figures: docs/benchmarks.md, "CPU inference without separate bias, ReLU and batch-norm
passes". ``plain_inference()`` turns them all off in its thread (for comparisons and
debugging); training, tracing, export and GPUs never take them.
"""

import logging
from typing import Optional

import torch
import torch.nn.functional as F

from .thread_flag import ThreadFlag

__all__ = ["apply_linear", "fast_cpu_inference", "linear", "plain_inference", "plain_inference_active"]

logger = logging.getLogger(__name__)

_PLAIN = ThreadFlag()
_ONEDNN_LINEAR = {"usable": None}


def plain_inference(enabled: bool = True):
    """A context within which (in this thread) CPU inference takes the plain PyTorch
    formulation everywhere: ``F.linear``, the backbone's own forward, and the attention's
    locations and the mask head's sampling composed from tensors (no fused ``soit._C``
    entries; the attention op itself still follows its routing rule)."""
    return _PLAIN.set(enabled)


def plain_inference_active() -> bool:
    """True inside :func:`plain_inference` (in this thread)."""
    return bool(_PLAIN)


def compiler_flag(name: str) -> bool:
    """``torch.compiler.<name>()`` (``is_compiling``, ``is_exporting``), False where absent."""
    flag = getattr(getattr(torch, "compiler", None), name, None)
    return bool(flag is not None and flag())


def fast_cpu_inference(x: torch.Tensor) -> bool:
    """True when a computation on ``x`` may take the faster CPU formulation: ``x`` is a
    float32 or float64 CPU tensor, no gradient is recorded, nothing is being traced,
    scripted, compiled or exported, and :func:`plain_inference` is not active."""
    if plain_inference_active():
        return False
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if torch.is_grad_enabled() or torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    if torch.onnx.is_in_onnx_export() or compiler_flag("is_compiling") or compiler_flag("is_exporting"):
        return False
    return True


def _onednn_linear_usable() -> bool:
    usable = _ONEDNN_LINEAR["usable"]
    if usable is None:
        usable = bool(
            torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        )
        _ONEDNN_LINEAR["usable"] = usable
    return usable


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, relu: bool = False):
    """``F.linear(x, weight, bias)``, followed by a ReLU when ``relu``.

    Under :func:`fast_cpu_inference` with float32 tensors, one oneDNN call computes the
    product, adds the bias and applies the ReLU as it writes each output; elsewhere the
    plain composition runs. The two differ only by the order of float additions.

    Args:
        x: (..., in_features).
        weight: (out_features, in_features).
        bias: (out_features,) or None.
    """
    if (
        fast_cpu_inference(x)
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[-1]
        and x.numel() > 0
        and _onednn_linear_usable()
    ):
        try:
            out = torch.ops.mkldnn._linear_pointwise(
                x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), bias, "relu" if relu else "none", [], ""
            )
            return out.view(*x.shape[:-1], weight.shape[0])
        except RuntimeError as e:  # a torch build whose oneDNN rejects the call: never again
            _ONEDNN_LINEAR["usable"] = False
            logger.warning("oneDNN linear unavailable (%s); CPU inference uses F.linear", e)
    out = F.linear(x, weight, bias)
    return out.relu() if relu else out


def apply_linear(module: torch.nn.Module, x: torch.Tensor, relu: bool = False):
    """``module(x)`` (then a ReLU when ``relu``) for an ``nn.Linear``, through :func:`linear`.
    A module of another type (a subclass, a wrapped or quantised layer) or one with forward
    hooks is called as it is, so that whatever it adds still runs."""
    if type(module) is not torch.nn.Linear or module._forward_hooks or module._forward_pre_hooks:
        out = module(x)
        return out.relu() if relu else out
    return linear(x, module.weight, module.bias, relu)
