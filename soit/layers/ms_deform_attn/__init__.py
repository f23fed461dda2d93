"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021).

Shapes follow the paper's notation:
    N  batch, S  flattened value tokens (sum over levels of H_l * W_l),
    M  heads, D  channels per head, Lq queries, L levels, P points per level.

Implementations:
    * the compiled op in ``soit._C``: CUDA kernels, and a CPU implementation laid out for the
      CPU (threads over queries, vectorised channel loops, an AVX2 copy where the CPU has it);
    * :func:`ms_deform_attn_pytorch`, the ``grid_sample`` formulation: runs everywhere, traces
      and exports; used whenever the extension is missing or cannot run the tensor;
    * :func:`ms_deform_attn_pytorch_gather`, a second pure-PyTorch formulation (explicit
      gathers of the four neighbours), which indexes shared value maps without a loop.

Which one a call takes is one rule, written out in :mod:`.dispatch`: ``soit._C`` for CPU
tensors and for CUDA tensors on a GPU it has code for, the PyTorch path otherwise, inside
:func:`force_pytorch` (a context manager) and in exported graphs. ``SOIT_NO_EXT=1`` in the
environment makes the package ignore ``soit._C`` altogether; ``impl="pytorch"`` or
``impl="kernel"`` chooses for one call.

Export: the op is also registered with ``torch.library`` as ``soit::ms_deform_attn`` (with its
autograd and a fake implementation, :mod:`.op`). ``torch.jit.trace`` and ``torch.compile``
record that op, so a TorchScript model traced from SOIT calls ``soit._C`` where it serves the
tensors and the PyTorch path elsewhere; loading such a model needs ``import soit`` first (the
op is defined in Python). ONNX export (and ``torch.export``) records the ``grid_sample``
formulation instead, with the level sizes read from ``spatial_shapes`` at run time, so the
graph runs at any input size.

Files: ``extension.py`` (loading ``soit._C``), ``pytorch.py`` (the PyTorch formulations),
``op.py`` (the autograd function and the registered op), ``dispatch.py`` (the routing rule
and :func:`ms_deform_attn`), ``module.py`` (:class:`MSDeformAttn`).
"""

from .dispatch import EXPORT_FORMULATIONS, export_formulation, force_pytorch, mask_head_kernel, ms_deform_attn, offsets_kernel
from .extension import extension_status, has_cuda_kernel
from .module import MSDeformAttn
from .pytorch import ms_deform_attn_pytorch, ms_deform_attn_pytorch_gather

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "ms_deform_attn_pytorch_gather",
    "MSDeformAttn",
    "EXPORT_FORMULATIONS",
    "export_formulation",
    "force_pytorch",
    "mask_head_kernel",
    "offsets_kernel",
    "has_cuda_kernel",
    "extension_status",
]
