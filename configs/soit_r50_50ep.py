"""SOIT R-50 on COCO, the official 50-epoch recipe (42.2 mask AP / 48.9 box AP official)."""
from .common.data.coco import dataloader
from .common.optim import optimizer
from .common.schedule import epochs_to_iters, step_schedule
from .common.train import train
from .models.soit_r50 import model

# 50 epochs at total batch 32 = 184,823 iterations; lr x0.1 after epoch 40 (147,859)
train.max_iter = epochs_to_iters(50)
lr_multiplier = step_schedule(50, 40)
train.checkpointer.period = epochs_to_iters(1)
train.eval_period = epochs_to_iters(5)
