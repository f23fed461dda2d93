"""COCO instance segmentation with the DETR augmentation (docs/model.md, section 8)."""
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from soit.data import SOITDatasetMapper

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    # images without annotations are kept: they teach the classifier what background is
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train", filter_empty=False),
    # DETR's augmentation: each image goes through one of the two lists (probability 1/2);
    # every step is a LazyCall, so e.g. dataloader.train.mapper.augmentation.1.max_size=1000
    # works on the command line (soit.data.detr_augmentations builds the same lists in Python)
    mapper=L(SOITDatasetMapper)(
        is_train=True,
        augmentation=[
            L(T.RandomFlip)(prob=0.5, horizontal=True, vertical=False),
            L(T.ResizeShortestEdge)(short_edge_length=list(range(480, 801, 32)), max_size=1333, sample_style="choice"),
        ],
        augmentation_with_crop=[
            L(T.RandomFlip)(prob="${...augmentation.0.prob}", horizontal=True, vertical=False),
            L(T.ResizeShortestEdge)(short_edge_length=[400, 500, 600], sample_style="choice"),
            L(T.RandomCrop)(crop_type="absolute_range", crop_size=(384, 600)),
            # the final resize of the other list
            L(T.ResizeShortestEdge)(
                short_edge_length="${...augmentation.1.short_edge_length}",
                max_size="${...augmentation.1.max_size}",
                sample_style="choice",
            ),
        ],
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
