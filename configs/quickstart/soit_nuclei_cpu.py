"""The CPU quick start: a small SOIT trained from scratch on the nuclei tiles (soit/data/nuclei.py).

Three 256x256 tiles of one fluorescence image (upscaled x2 to 512x512) train, the fourth is
held out for COCOEvaluator. Run it with ``bash scripts/quickstart.sh``.
"""
import os

from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from soit.data import SOITDatasetMapper
from soit.data.augmentation import RandomRotation90
from soit.data.nuclei import register_nuclei
from soit.solver import FractionStepScheduler

from ..common.optim import optimizer
from ..common.train import train
from ..models.soit_tiny import model

# registering is cheap (nothing is read until the dataset is used); tools/quickstart.py
# prepares the files under datasets/nuclei first
register_nuclei(os.environ.get("SOIT_NUCLEI_ROOT", "datasets/nuclei"))

model.num_classes = 1
# Training options beyond the paper that won on this split (docs/benchmarks.md, "Training
# options"; projects/SOIT/README.md): DINO's mixed query selection and look-forward-twice,
# Align-DETR's IoU-aware BCE. soit_nuclei_cpu_paper.py trains as the paper does.
model.transformer.mixed_query_selection = True
model.transformer.look_forward_twice = True
model.criterion.cls_loss = "ia_bce"
model.transformer.num_queries = 100  # up to ~40 nuclei per tile
model.max_detections = 100
model.transformer.dropout = 0.0  # a short run on little data: dropout only slows convergence
model.mask_encoder.dropout = 0.0
# Inference takes what it needs from training (recorded when training starts, saved in the
# checkpoint; docs/scale.md): the 256 x 256 training crops make it predict larger images as
# overlapping 256 x 256 tiles (positions are fractions of the input), and the training nuclei's
# sizes make it predict each image at the magnification that gives its nuclei those sizes,
# measured at a first look at the image's own size (the prediction itself when they have
# them) and checked where they should have them. model.tile_size=0 / model.auto_scale=False turn
# either off.
model.tile_overlap = 64  # >= the largest nucleus (~60 px), so each is whole in some tile
model.auto_scale = True

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="nuclei_train", filter_empty=False),
    mapper=L(SOITDatasetMapper)(
        is_train=True,
        augmentation=[
            L(T.RandomFlip)(horizontal=True, vertical=False),
            L(T.RandomFlip)(horizontal=False, vertical=True),
            L(RandomRotation90)(),
            # 256x256 crops of the 512x512 tiles: a quarter of the compute per step, and
            # the nuclei keep the size they have at test time
            L(T.RandomCrop)(crop_type="absolute", crop_size=(256, 256)),
        ],
        image_format="RGB",
    ),
    total_batch_size=2,
    aspect_ratio_grouping=False,
    num_workers=0,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="nuclei_val", filter_empty=False),
    mapper=L(SOITDatasetMapper)(is_train=False, augmentation=[], image_format="RGB"),
    num_workers=0,
)
dataloader.evaluator = L(COCOEvaluator)(dataset_name="nuclei_val", use_fast_impl=False, max_dets_per_image=100)

train.device = "cpu"
train.init_checkpoint = ""  # from scratch: no ImageNet weights are needed
train.max_iter = 700  # 1400 scored lower (9.9 segm AP): DETR-style training on 3 tiles is noisy
train.checkpointer.period = 100
train.checkpointer.max_to_keep = 2  # and model_final.pth: 142 MB each, a resumed run needs only the last
train.eval_period = 0  # evaluated once at the end by tools/quickstart.py
train.log_period = 10
train.best_metric = ""
optimizer.lr = 1e-3
optimizer.fused = True  # the fused AdamW step is several times faster on the CPU
optimizer.params.lr_multipliers = {"sampling_offsets": 0.1}  # a backbone trained from scratch learns at full lr
# lr x0.1 for the last 15% of the iterations, whatever max_iter is
lr_multiplier = L(FractionStepScheduler)(values=[1.0, 0.1], fractions=[0.85])
