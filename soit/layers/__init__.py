from .cpu_inference import plain_inference
from .mlp import MLP
from .ms_deform_attn import MSDeformAttn, ms_deform_attn, ms_deform_attn_pytorch

__all__ = ["MLP", "MSDeformAttn", "ms_deform_attn", "ms_deform_attn_pytorch", "plain_inference"]
