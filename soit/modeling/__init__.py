from .criterion import SetCriterion
from .denoising import DenoisingQueries
from .mask_encoder import MaskEncoder
from .mask_head import InstanceAwareMaskHead
from .matcher import HungarianMatcher
from .meta_arch import SOIT, soit_postprocess
from .neck import ChannelMapper
from .transformer import DeformableTransformer

__all__ = [
    "SOIT",
    "ChannelMapper",
    "DeformableTransformer",
    "DenoisingQueries",
    "MaskEncoder",
    "InstanceAwareMaskHead",
    "HungarianMatcher",
    "SetCriterion",
    "soit_postprocess",
]
