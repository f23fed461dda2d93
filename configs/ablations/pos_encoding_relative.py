"""Table 4: position encoding "relative" in the instance-aware transformer (base absolute)."""
from .base import dataloader, lr_multiplier, model, optimizer, train

model.mask_head.pos_encoding = "relative"
