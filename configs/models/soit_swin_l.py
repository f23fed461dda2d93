"""SOIT Swin-L: the R-50 model with a Swin-L backbone from timm (strides 8, 16, 32)."""
from detectron2.config import LazyCall as L

from soit.modeling.backbone import TimmBackbone

from .soit_r50 import model

model.backbone = L(TimmBackbone)(
    model_name="swin_large_patch4_window12_384",
    out_indices=(1, 2, 3),
    strict_img_size=False,  # any input size: Swin pads to its window internally
    drop_path_rate=0.3,
)
model.in_features = ["stage2", "stage3", "stage4"]
model.neck.in_channels = [384, 768, 1536]
