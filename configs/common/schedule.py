"""Step schedules expressed in iterations.

The official schedule is 50 epochs at a total batch of 32, lr x0.1 after epoch 40. One epoch
of COCO train2017 (118,287 images; DETR-style training keeps those without annotations) is
118,287 / 32 = 3,696.5 iterations. For another total batch B, multiply the iterations by
32 / B (``epochs_to_iters(epochs, B)``) and, as usual, scale the learning rate with B.
"""
from detectron2.config import LazyCall as L
from fvcore.common.param_scheduler import MultiStepParamScheduler

COCO_IMAGES = 118_287


def epochs_to_iters(epochs: float, total_batch_size: int = 32, num_images: int = COCO_IMAGES) -> int:
    return int(round(epochs * num_images / total_batch_size))


def step_schedule(total_epochs: float, drop_epoch: float, total_batch_size: int = 32, num_images: int = COCO_IMAGES):
    """lr x1 until ``drop_epoch``, then x0.1; no warm-up (the official recipe has none)."""
    total = epochs_to_iters(total_epochs, total_batch_size, num_images)
    drop = epochs_to_iters(drop_epoch, total_batch_size, num_images)
    return L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[drop], num_updates=total)
