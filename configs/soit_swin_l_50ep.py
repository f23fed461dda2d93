"""SOIT Swin-L on COCO, 50 epochs.

The backbone is timm's ``swin_large_patch4_window12_384``; point ``train.init_checkpoint``
at its ImageNet-22k weights saved as a state dict under ``backbone.body.*`` names (timm
cannot download here).
"""
from .soit_r50_50ep import dataloader, lr_multiplier, optimizer, train
from .models.soit_swin_l import model

train.init_checkpoint = "checkpoints/swin_large_patch4_window12_384_22k_soit.pth"
