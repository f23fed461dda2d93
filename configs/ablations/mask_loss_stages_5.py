"""Table 5: mask loss on the last 5 decoder layers (the full model has 6)."""
from ..soit_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.criterion.mask_loss_layers = 5
