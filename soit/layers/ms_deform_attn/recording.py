"""What the deformable attention samples, recorded from the real forward (for pictures of
where the model looks: ``tools/visualize_attention.py``).

Inside :func:`record_attention` (in this thread), every call of the attention made by
:class:`~soit.layers.ms_deform_attn.MSDeformAttn` (encoder, decoder and mask-encoder layers)
and by the instance-aware mask head appends an :class:`AttentionCall` holding the very tensors
handed to the op; CPU inference's fused entries, which form the locations inside the kernel,
are not taken meanwhile, so every call has its locations. Outside it the cost is one
thread-local check per call.
"""
import contextlib
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..thread_flag import ThreadFlag

__all__ = ["AttentionCall", "record_attention", "recording", "record_call"]

_RECORD = ThreadFlag()


@dataclass
class AttentionCall:
    """One call of the attention: ``module`` made it; ``locations`` (N, Lq, M, L, P, 2) in
    [0, 1] of each level ((x, y), the padded map), ``weights`` (N, Lq, M, L, P);
    ``reference_points`` what the module was given ((N, Lq, L, 2) points or (N, Lq, L, 4)
    boxes; None for the mask head, whose references are the pixel centres); ``value_index``
    the value map of each group (mask head) or None."""

    module: torch.nn.Module
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    locations: torch.Tensor
    weights: torch.Tensor
    reference_points: Optional[torch.Tensor] = None
    value_index: Optional[torch.Tensor] = None


@contextlib.contextmanager
def record_attention():
    """A context that yields the list the calls are appended to."""
    calls: List[AttentionCall] = []
    with _RECORD.set(calls):
        yield calls


def recording() -> bool:
    return _RECORD.value is not False


def record_call(module, spatial_shapes, level_start_index, locations, weights, reference_points=None, value_index=None):
    """Append one call to the active record (nothing outside :func:`record_attention`)."""
    calls = _RECORD.value
    if calls is False:
        return
    calls.append(AttentionCall(module, spatial_shapes, level_start_index, locations, weights, reference_points, value_index))
