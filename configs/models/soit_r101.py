"""SOIT R-101: the R-50 model with a deeper backbone (same channels at C3..C5)."""
from .soit_r50 import model

model.backbone.stages.depth = 101
