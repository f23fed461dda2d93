"""Table 3: C_mask = 16 mask-feature channels (base 8); D follows from M, K and C_mask."""
from .base import dataloader, lr_multiplier, model, optimizer, train

model.mask_head.mask_channels = 16
