from .criterion import SetCriterion
from .denoising import DenoisingQueries
from .mask_encoder import MaskEncoder
from .mask_head import InstanceAwareMaskHead
from .matcher import HungarianMatcher
from .meta_arch import SOIT
from .neck import ChannelMapper
from .postprocessing import soit_postprocess
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
