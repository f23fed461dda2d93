"""Inference on plain numpy images with a LazyConfig model: config + weights in, ``Instances`` out."""
from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.structures import Instances
from omegaconf import DictConfig, OmegaConf

from ..checkpoint.safe_load import SafeCheckpointer
from ..config import load_config
from ..data.metadata import dataset_metadata
from .overrides import apply_overrides

__all__ = ["Predictor", "config_test_augmentations"]

logger = logging.getLogger(__name__)

_FORMATS = ("RGB", "BGR")


class Predictor:
    """A LazyConfig model in eval mode that takes one (H, W, 3) uint8 image at a time.

    The image goes through the test-time augmentations of ``cfg.dataloader.test.mapper``
    (e.g. ``ResizeShortestEdge(800, 1333)`` for COCO, none for the quick start), is put
    in the model's channel order, and the detections come back on the CPU in the size of
    the image that was passed in.

    Example::

        predictor = Predictor("configs/soit_r50_50ep.py", checkpoint="model_final.pth")
        instances = predictor(cv2.imread("input.jpg"))  # BGR, as OpenCV reads it
        instances.pred_masks  # (N, H, W) bool, H x W of input.jpg
    """

    def __init__(
        self,
        config: str | os.PathLike | DictConfig,
        checkpoint: str | None = None,
        device: str | torch.device = "cpu",
        overrides: Sequence[str] = (),
        *,
        trust_pickle: bool = False,
        trust_config: bool = False,
    ):
        """
        Args:
            config: path of a LazyConfig (.py or .yaml), or a config already loaded with
                :func:`soit.config.load_config` (copied, never changed).
            checkpoint: weights to load; default ``cfg.train.init_checkpoint``. Without
                either the model keeps its random initialisation (a warning says so).
            device: where the model runs; outputs are always returned on the CPU.
            overrides: ``key=value`` strings, as on the command line of ``train_net.py``.
            trust_pickle: read the checkpoint with full unpickling (it can run code: trusted
                files only); by default only weights and plain values are read.
            trust_config: read a YAML config without refusing Python tags, resolvers and
                ``_target_`` callables outside the allow-list (trusted files only; see
                :func:`soit.config.load_config`).
        """
        if isinstance(config, (str, os.PathLike)):
            if not os.path.isfile(config):
                raise FileNotFoundError(f"config file {str(config)!r} does not exist")
            self.cfg = load_config(str(config), overrides, trust_config=trust_config, trust_pickle=trust_pickle)
        elif isinstance(config, DictConfig):
            self.cfg = apply_overrides(copy.deepcopy(config), list(overrides))
        else:
            raise TypeError(f"config must be a path or an omegaconf DictConfig, got {type(config).__name__}")

        path = str(checkpoint) if checkpoint else OmegaConf.select(self.cfg, "train.init_checkpoint", default=None)
        if path:  # before building the model: a wrong path fails at once
            _check_exists(path, "checkpoint" if checkpoint else "train.init_checkpoint")
        self.model = instantiate(self.cfg.model).eval().to(device)
        self.input_format = getattr(self.model, "input_format", "RGB")
        if self.input_format not in _FORMATS:
            raise ValueError(f"model.input_format must be one of {_FORMATS}, got {self.input_format!r}")
        self.augmentations = T.AugmentationList([instantiate(a) for a in config_test_augmentations(self.cfg)])

        if path:
            SafeCheckpointer(self.model, trust_pickle=trust_pickle, complete=True).load(path)
        else:
            logger.warning(
                "no checkpoint given and no train.init_checkpoint in the config: the model is randomly initialised"
            )

    @property
    def metadata(self) -> Metadata:
        """Metadata (``thing_classes`` ...) of the config's first test dataset, or an empty one."""
        names = OmegaConf.select(self.cfg, "dataloader.test.dataset.names", default=None)
        if isinstance(names, str):
            names = [names]
        return dataset_metadata(names[0]) if names else Metadata()

    def __call__(self, image: np.ndarray, format: str = "BGR") -> Instances:
        """Detections of one image.

        Args:
            image: (H, W, 3) uint8 in ``format`` channel order, or (H, W) grayscale.
            format: "BGR" (``cv2.imread``) or "RGB" (PIL).

        Returns:
            ``Instances`` of image size (H, W) on the CPU: ``pred_boxes`` (absolute XYXY),
            ``scores``, ``pred_classes`` and ``pred_masks`` ((N, H, W) bool).
        """
        return self._run([self._to_input(_check_image(image, "image"), format)])[0]

    def batch(self, images: Sequence[np.ndarray], format: str = "BGR") -> list[Instances]:
        """Detections of several images (any sizes) in a single forward pass; see ``__call__``."""
        inputs = [self._to_input(_check_image(img, f"images[{i}]"), format) for i, img in enumerate(images)]
        return self._run(inputs) if inputs else []

    def _run(self, inputs: list[dict]) -> list[Instances]:
        with torch.inference_mode():
            outputs = self.model(inputs)
        results = []
        for x, out in zip(inputs, outputs):
            instances = out["instances"].to("cpu")
            if instances.image_size != (x["height"], x["width"]):
                raise RuntimeError(
                    f"the model returned detections of size {instances.image_size} for an image of size "
                    f"{(x['height'], x['width'])}: its forward must rescale to the given height and width"
                )
            results.append(instances)
        return results

    def _to_input(self, image: np.ndarray, format: str) -> dict:
        """One model input dict: augmented CHW tensor in the model's order, original size."""
        if format not in _FORMATS:
            raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
        height, width = image.shape[:2]
        if format != self.input_format:
            image = image[:, :, ::-1]
        aug_input = T.AugInput(np.ascontiguousarray(image))
        self.augmentations(aug_input)
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width}


def config_test_augmentations(cfg) -> list:
    """The test mapper's augmentation configs (SOIT's mapper calls them ``augmentation``,
    detectron2's ``augmentations``), or none; not instantiated."""
    mapper = OmegaConf.select(cfg, "dataloader.test.mapper", default=None)
    if mapper is None:
        return []
    for key in ("augmentation", "augmentations"):
        if key in mapper and mapper[key] is not None:
            return list(mapper[key])
    return []


def _check_exists(path: str, what: str) -> None:
    # detectron2://, https:// ... are resolved (and downloaded) by the checkpointer itself
    if "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist; pass the path of a .pth/.pkl weights file")


def _check_image(image, name: str) -> np.ndarray:
    """``image`` as (H, W, 3) uint8; grayscale (H, W) or (H, W, 1) is repeated into 3 channels."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy array (H, W, 3) uint8, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(
            f"{name} must be uint8 (0..255), got dtype {image.dtype} with shape {image.shape}; "
            "convert it, e.g. with np.clip(x, 0, 255).astype(np.uint8)"
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        hint = " (channels first? pass (H, W, 3))" if image.ndim == 3 and image.shape[0] in (1, 3) else ""
        raise ValueError(f"{name} must have shape (H, W, 3) or (H, W), got {image.shape}{hint}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {image.shape}")
    return image
