"""Table 4: 2 mask-encoder layers (base 1; 0 = Linear + LayerNorm on P3 only)."""
from .base import dataloader, lr_multiplier, model, optimizer, train

model.mask_encoder.num_layers = 2
