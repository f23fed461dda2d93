"""Data: the dataset mapper with the DETR augmentation, and the nuclei quick-start dataset."""
from .augmentation import RandomRotation90, Rot90Transform, detr_augmentations, detr_test_augmentation
from .dataset_mapper import SOITDatasetMapper, decode_segmentation, mask_to_box, read_image_8bit
from .nuclei import prepare_nuclei, register_nuclei

__all__ = [
    "SOITDatasetMapper",
    "detr_augmentations",
    "detr_test_augmentation",
    "RandomRotation90",
    "Rot90Transform",
    "read_image_8bit",
    "decode_segmentation",
    "mask_to_box",
    "prepare_nuclei",
    "register_nuclei",
]
