"""SOIT R-50 on COCO in 12 epochs with the training options that won on the small-data
benchmark (docs/benchmarks.md, "Training options"): DINO's mixed query selection and
look-forward-twice, Align-DETR's IoU-aware BCE classification (projects/SOIT/README.md,
"Training options beyond the paper"). Not trained on COCO here: no figure is claimed.

The paper's training with the same schedule: ``model.criterion.cls_loss=focal
model.transformer.mixed_query_selection=False model.transformer.look_forward_twice=False``.
"""
from .common.data.coco import dataloader
from .common.optim import optimizer
from .common.schedule import epochs_to_iters, step_schedule
from .common.train import train
from .models.soit_r50 import model

model.transformer.mixed_query_selection = True
model.transformer.look_forward_twice = True
model.criterion.cls_loss = "ia_bce"

# 12 epochs at total batch 32; lr x0.1 after epoch 11 (DINO's and H-DETR's 12-epoch schedule)
train.max_iter = epochs_to_iters(12)
lr_multiplier = step_schedule(12, 11)
train.checkpointer.period = epochs_to_iters(1)
train.eval_period = epochs_to_iters(2)
