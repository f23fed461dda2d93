from .cpu_inference import plain_inference
from .ms_deform_attn import MSDeformAttn, ms_deform_attn, ms_deform_attn_pytorch

__all__ = ["MSDeformAttn", "ms_deform_attn", "ms_deform_attn_pytorch", "plain_inference"]
