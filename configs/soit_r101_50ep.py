"""SOIT R-101 on COCO, 50 epochs (42.9 mask AP / 49.5 box AP official)."""
from .soit_r50_50ep import dataloader, lr_multiplier, optimizer, train
from .models.soit_r101 import model

train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-101.pkl"
