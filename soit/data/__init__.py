"""Data: the dataset mapper with the DETR augmentation, and the small real datasets (nuclei
for the quick start, HeLa nuclei)."""
from .augmentation import (
    RandomRescale,
    RandomRotation90,
    Rot90Transform,
    ScaleBy,
    detr_augmentations,
    detr_test_augmentation,
)
from .dataset_mapper import (
    SOITDatasetMapper,
    decode_segmentation,
    mask_to_box,
    patch_map_dataset_fallback,
    read_image_8bit,
)
from .hela import prepare_hela, register_hela
from .nuclei import prepare_nuclei, register_nuclei

__all__ = [
    "SOITDatasetMapper",
    "detr_augmentations",
    "detr_test_augmentation",
    "RandomRotation90",
    "RandomRescale",
    "ScaleBy",
    "Rot90Transform",
    "read_image_8bit",
    "decode_segmentation",
    "mask_to_box",
    "patch_map_dataset_fallback",
    "prepare_nuclei",
    "register_nuclei",
    "prepare_hela",
    "register_hela",
]
