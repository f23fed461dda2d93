"""Base of the paper's Tables 2-4: the 50-epoch R-50 recipe with the mask loss on the last
decoder layer only and the absolute position encoding (38.4 mask AP in the paper)."""
from ..soit_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.criterion.mask_loss_layers = 1
model.mask_head.pos_encoding = "absolute"
