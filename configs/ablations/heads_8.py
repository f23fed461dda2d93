"""Table 2: M = 8 heads in the instance-aware transformer (base 4)."""
from .base import dataloader, lr_multiplier, model, optimizer, train

model.mask_head.num_heads = 8
