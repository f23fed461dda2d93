"""A tiny SOIT for fast CPU tests and the quick start: the R-50 model with a ResNet-18
backbone, a 64-wide transformer with 1 encoder and 2 decoder layers, and 30 queries."""
from .soit_r50 import model

model.backbone.stages.depth = 18
model.backbone.stages.pop("stride_in_1x1")  # BasicBlock (R-18/34) has a single stride
model.backbone.stem.norm = "BN"  # trained from scratch: BatchNorm statistics must adapt
model.backbone.stages.norm = "BN"
model.backbone.freeze_at = 0
model.neck.in_channels = [128, 256, 512]
model.embed_dim = 64
model.neck.num_groups = 8
model.transformer.num_encoder_layers = 1
model.transformer.num_decoder_layers = 2
model.transformer.ffn_dim = 128
model.transformer.num_queries = 30
