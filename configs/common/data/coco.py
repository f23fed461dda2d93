"""COCO instance segmentation with the DETR augmentation (docs/model.md, section 8)."""
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from soit.data import SOITDatasetMapper, detr_augmentations

dataloader = OmegaConf.create()

augmentation, augmentation_with_crop = detr_augmentations(
    min_sizes=tuple(range(480, 801, 32)), max_size=1333, crop_min_sizes=(400, 500, 600), crop_size=(384, 600)
)
dataloader.train = L(build_detection_train_loader)(
    # images without annotations are kept: they teach the classifier what background is
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train", filter_empty=False),
    mapper=L(SOITDatasetMapper)(
        is_train=True,
        augmentation=augmentation,
        augmentation_with_crop=augmentation_with_crop,
        image_format="RGB",  # must equal model.input_format (train_net.py checks)
    ),
    total_batch_size=32,
    aspect_ratio_grouping=True,
    num_workers=4,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(SOITDatasetMapper)(
        is_train=False,
        augmentation=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
        image_format="RGB",  # must equal model.input_format (train_net.py checks)
    ),
    num_workers=4,
)
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    # the fast C++ COCOeval is part of detectron2's compiled ops; pycocotools' is exact too
    use_fast_impl=False,
)
