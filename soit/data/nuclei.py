"""The nuclei quick-start dataset: real microscopy masks that ship inside a PyPI package.

``stardist==0.9.2`` (BSD-3-Clause) carries a 512 x 512 fluorescence image of nuclei from
the 2018 Data Science Bowl (``img2d.tif``, uint16, values 0..235) and its instance labels
(``mask2d.tif``, 125 nuclei). :func:`prepare_nuclei` downloads the wheel (no install),
checks the two files against the checksums below, and writes a COCO dataset:

- split: the four 256 x 256 quadrants hold 35 (top-left), 33 (top-right), 40 (bottom-left)
  and 29 (bottom-right) nuclei. Bottom-right is held out for validation (29 instances);
  the other three train (108 instances). A nucleus cut by a quadrant border stays in each
  quadrant it touches, as its visible part.
- intensity: ``(x - p1) / (p99.8 - p1)`` clipped to [0, 1] and scaled to 0..255, with the
  1st and 99.8th percentiles of the whole 512 x 512 image (8 and 206), so that both
  splits share one scaling; the gray value is repeated into R, G and B.
- size: tiles are upscaled by ``scale`` (default 2 -> 512 x 512; bilinear for the image,
  nearest for the labels) because nuclei (median ~440 px) are small next to the model's
  stride-8 mask features.
"""
import io
import os
from typing import Dict, Optional, Sequence

import numpy as np

from .packaged import download_wheel, prepare_tiled_dataset, read_checked_members, split_files, stretch_to_uint8

__all__ = ["prepare_nuclei", "register_nuclei", "STARDIST_VERSION", "NUCLEI_SHA256", "QUADRANTS", "VAL_QUADRANT"]

STARDIST_VERSION = "0.9.2"
# SHA-256 of the two files inside the stardist 0.9.2 wheel (the same in every platform's wheel).
NUCLEI_SHA256 = {
    "stardist/data/images/img2d.tif": "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
    "stardist/data/images/mask2d.tif": "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f",
}
IMAGE_MEMBER, LABEL_MEMBER = list(NUCLEI_SHA256)
# Quadrant name -> (row, column) of its 256 x 256 tile.
QUADRANTS = {"top_left": (0, 0), "top_right": (0, 1), "bottom_left": (1, 0), "bottom_right": (1, 1)}
VAL_QUADRANT = "bottom_right"
TILE = 256
PERCENTILES = (1.0, 99.8)
CATEGORIES = [{"id": 1, "name": "nucleus", "supercategory": "nucleus"}]
# Fallback when pip finds no stardist wheel for this interpreter/platform: the data files
# are platform independent, so any wheel will do.
_FALLBACK_PLATFORM = ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                      "--implementation", "cp", "--abi", "cp311"]


def _download_wheel(cache_dir: str, version: str = STARDIST_VERSION) -> str:
    """Path of the stardist wheel in ``cache_dir``, downloading it with pip if needed."""
    return download_wheel("stardist", version, cache_dir, "the nuclei images", fallbacks=[_FALLBACK_PLATFORM])


def _read_checked(wheel: str, expected_sha256: Dict[str, str]) -> Dict[str, np.ndarray]:
    """Read the image and label tifs from the wheel after checking their SHA-256."""
    import tifffile  # only needed here, not to import soit.data

    members = read_checked_members(wheel, expected_sha256, f"stardist=={STARDIST_VERSION}")
    arrays = {member: tifffile.imread(io.BytesIO(data)) for member, data in members.items()}
    for member, array in arrays.items():
        if array.shape != (2 * TILE, 2 * TILE):
            raise RuntimeError(f"{member}: expected a {2 * TILE} x {2 * TILE} array, found shape {array.shape}")
    return arrays


def prepare_nuclei(
    root: str = "datasets/nuclei",
    scale: int = 2,
    *,
    cache_dir: Optional[str] = None,
    expected_sha256: Optional[Dict[str, str]] = None,
) -> Dict:
    """Write the nuclei dataset as COCO JSON + PNGs under ``root`` (see the module docstring).

    Writes ``root/train.json``, ``root/val.json``, ``root/images/<quadrant>.png`` and
    ``root/manifest.json``; nothing else under ``root`` is touched. When the manifest
    matches (package version, checksums, scale) and the outputs exist, nothing is redone.

    Args:
        root: output folder.
        scale: integer upscaling factor of the 256 x 256 tiles.
        cache_dir: where the downloaded wheel is kept; default ``root/.download``.
        expected_sha256: checksums of the two tif members of the wheel; default
            :data:`NUCLEI_SHA256` (overridable to test the mismatch error).

    Returns:
        dict with ``train_json``, ``val_json``, ``image_root``, ``num_instances``
        (``{"train": 108, "val": 29}``) and ``skipped`` (True when nothing was redone).
    """
    expected_sha256 = dict(expected_sha256 or NUCLEI_SHA256)
    cache_dir = cache_dir or os.path.join(root, ".download")
    manifest = {
        "stardist_version": STARDIST_VERSION,
        "sha256": expected_sha256,
        "scale": scale,
        "val_quadrant": VAL_QUADRANT,
        "percentiles": list(PERCENTILES),
    }

    def read():
        arrays = _read_checked(_download_wheel(cache_dir), expected_sha256)
        return stretch_to_uint8(arrays[IMAGE_MEMBER], PERCENTILES), arrays[LABEL_MEMBER]

    windows = {name: ((r * TILE, (r + 1) * TILE), (c * TILE, (c + 1) * TILE)) for name, (r, c) in QUADRANTS.items()}
    description = (
        f"nuclei {{split}} split: quadrants of img2d.tif/mask2d.tif from stardist=="
        f"{STARDIST_VERSION} (2018 Data Science Bowl), upscaled x{scale}"
    )
    return prepare_tiled_dataset(root, manifest, read, windows, VAL_QUADRANT, scale, CATEGORIES, description)


def register_nuclei(root: str = "datasets/nuclei", names: Sequence[str] = ("nuclei_train", "nuclei_val")) -> None:
    """Register the train and val splits with detectron2's ``register_coco_instances``.

    A name already registered with the same files is left alone; one registered with
    other files is an error (re-registering would silently change a running experiment).
    """
    from .metadata import register_coco_once

    outputs = split_files(root)
    for name, json_file in zip(names, (outputs["train_json"], outputs["val_json"])):
        # thing_classes up front lets configs check the class count before the data is loaded.
        register_coco_once(name, json_file, outputs["image_root"], {"thing_classes": ["nucleus"]})
