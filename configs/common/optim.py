"""AdamW with SOIT's learning-rate multipliers (docs/model.md, section 8)."""
import torch
from detectron2.config import LazyCall as L

from soit.solver import get_optimizer_params

optimizer = L(torch.optim.AdamW)(
    params=L(get_optimizer_params)(
        # model is set by train_net.py
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        # x0.1 for the backbone and every deformable sampling-offset layer
        lr_multipliers={"backbone": 0.1, "sampling_offsets": 0.1},
    ),
    lr=2e-4,
    weight_decay=1e-4,
    betas=(0.9, 0.999),
)
