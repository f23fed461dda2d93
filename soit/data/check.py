"""Checking a COCO-format instance dataset before spending time on it.

The problems found are those that make training drop data, make COCO evaluation crash
(pycocotools on an empty polygon) or lie (a NaN box inflates bbox AP), or make the model
fail on an image (fewer encoder tokens than queries). ``tools/check_dataset.py`` prints
them; ``train_net.py`` logs them for its training sets and refuses evaluation sets whose
ground truth would make COCO evaluation crash or lie.
"""
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional

__all__ = [
    "Problem",
    "check_coco_json",
    "check_registered_dataset",
    "encoder_tokens",
    "min_image_side",
    "read_coco_json",
]

# feature strides of the encoder's levels (C3-C5 and one extra level)
ENCODER_STRIDES = (8, 16, 32, 64)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: where (image, annotation id) and what."""

    image: str
    annotation: Optional[int]
    what: str
    breaks_evaluation: bool = False  # COCO evaluation would crash on it or score it wrongly

    def __str__(self):
        where = f"image {self.image}" + (f", annotation {self.annotation}" if self.annotation is not None else "")
        return f"{where}: {self.what}"


def encoder_tokens(height, width, strides=ENCODER_STRIDES):
    """Encoder tokens of an input of this size (one per feature pixel of every level)."""
    return sum(math.ceil(height / s) * math.ceil(width / s) for s in strides)


def min_image_side(num_queries, strides=ENCODER_STRIDES):
    """The smallest square side whose encoder tokens are at least ``num_queries``."""
    side = 1
    while encoder_tokens(side, side, strides) < num_queries:
        side += 1
    return side


def read_coco_json(path):
    """The parsed JSON; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        with open(path) as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path} is not a COCO annotation file: it has no 'images' list")
    return data


def _finite_numbers(values):
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _check_segmentation(segm, height, width):
    """What is wrong with a COCO segmentation (polygons or RLE), or None."""
    if isinstance(segm, list):
        if not segm:
            return "empty polygon list"
        for i, poly in enumerate(segm):
            if not isinstance(poly, list) or not _finite_numbers(poly):
                return f"polygon {i} is not a list of finite numbers"
            if len(poly) % 2:
                return f"polygon {i} has an odd number of coordinates ({len(poly)})"
            if len(poly) < 6:
                return f"polygon {i} has {len(poly) // 2} points (at least 3 needed)"
        return None
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            return "RLE without 'counts' and 'size'"
        if height is not None and list(segm["size"]) != [height, width]:
            return f"RLE size {list(segm['size'])} differs from the image's [{height}, {width}]"
        return None
    return f"segmentation is a {type(segm).__name__}, expected polygons or RLE"


def check_coco_json(json_file, image_root=None, num_queries=0, check_files=True) -> List[Problem]:
    """Every problem of a COCO instance-segmentation JSON (and its images, when
    ``image_root`` is given and ``check_files``): NaN/inf/negative boxes, empty or short
    polygons, unknown categories and images, duplicate ids, images whose file is missing,
    unreadable or of another size than the JSON says, images with fewer encoder tokens than
    ``num_queries``."""
    data = read_coco_json(json_file)
    problems = []
    categories = data.get("categories") or []
    cat_ids = Counter(c.get("id") for c in categories if isinstance(c, dict))
    for cid, n in cat_ids.items():
        if n > 1:
            problems.append(Problem("-", None, f"category id {cid} is used by {n} categories", True))
    images = {}
    image_ids = Counter()
    min_side = min_image_side(num_queries) if num_queries else 0
    for img in data["images"]:
        image_ids[img.get("id")] += 1
        name = str(img.get("file_name", f"id {img.get('id')}"))
        images[img.get("id")] = img
        h, w = img.get("height"), img.get("width")
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
            problems.append(Problem(name, None, f"height/width {h}/{w} are not positive integers", True))
            continue
        if num_queries and encoder_tokens(h, w) < num_queries:
            problems.append(Problem(
                name, None, f"{w}x{h} gives {encoder_tokens(h, w)} encoder tokens, fewer than the model's "
                f"{num_queries} queries (images need about {min_side}x{min_side} pixels or more at the network input)",
            ))  # fmt: skip
        if image_root is not None and check_files:
            problems.extend(_check_file(os.path.join(image_root, name), name, h, w))
    for iid, n in image_ids.items():
        if n > 1:
            problems.append(Problem(f"id {iid}", None, f"image id {iid} is used by {n} images", True))
    ann_ids = Counter()
    for ann in data.get("annotations") or []:
        aid = ann.get("id")
        ann_ids[aid] += 1
        img = images.get(ann.get("image_id"))
        name = str(img.get("file_name", f"id {img.get('id')}")) if img else f"id {ann.get('image_id')}"
        if img is None:
            problems.append(Problem(name, aid, f"image_id {ann.get('image_id')} is not in 'images'", True))
        if ann.get("category_id") not in cat_ids:
            problems.append(Problem(name, aid, f"category_id {ann.get('category_id')} is not in 'categories'", True))
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and _finite_numbers(box)):
            problems.append(Problem(name, aid, f"bbox {box} is not 4 finite numbers", True))
        elif box[2] < 0 or box[3] < 0:
            problems.append(Problem(name, aid, f"bbox {box} has a negative width or height", True))
        if "segmentation" in ann:
            h, w = (img.get("height"), img.get("width")) if img else (None, None)
            what = _check_segmentation(ann["segmentation"], h, w)
            if what:
                problems.append(Problem(name, aid, what, True))
        if "area" in ann and not _finite_numbers([ann["area"]]):
            problems.append(Problem(name, aid, f"area {ann['area']} is not a finite number", True))
    for aid, n in ann_ids.items():
        if n > 1:
            problems.append(Problem("-", aid, f"annotation id {aid} is used by {n} annotations", True))
    return problems


def _check_file(path, name, height, width):
    if not os.path.isfile(path):
        return [Problem(name, None, f"the file {path} does not exist")]
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as e:  # any decoder error: the image is unusable either way
        return [Problem(name, None, f"the file {path} is not a readable image ({type(e).__name__}: {e})")]
    if (h, w) != (height, width):
        return [Problem(name, None, f"the file is {w}x{h} but the JSON says {width}x{height}", True)]
    return []


def check_registered_dataset(name, evaluation=False, num_queries=0, max_logged=20):
    """Check a dataset registered with a COCO ``json_file`` (others are not checked) and log
    its problems naming the dataset, image and annotation; training goes on (the mapper
    drops what it cannot use, saying so). ``num_queries``: also log images too small for
    that many queries at their size in the JSON (the test mapper may still resize them). With ``evaluation``, a ground truth that would make
    COCO evaluation crash or lie raises ``ValueError`` instead, before any time is spent."""
    import logging

    from detectron2.data import MetadataCatalog

    logger = logging.getLogger("soit")
    json_file = MetadataCatalog.get(name).get("json_file")
    if not json_file:
        return []
    problems = check_coco_json(json_file, num_queries=num_queries, check_files=False)
    for p in problems[:max_logged]:
        logger.warning(f"dataset {name!r} ({json_file}): {p}")
    if len(problems) > max_logged:
        logger.warning(f"dataset {name!r}: {len(problems) - max_logged} more problems (tools/check_dataset.py lists all)")
    bad = [p for p in problems if p.breaks_evaluation]
    if evaluation and bad:
        listed = "\n  ".join(str(p) for p in bad[:10])
        raise ValueError(
            f"dataset {name!r} ({json_file}) cannot be evaluated with COCO metrics: {len(bad)} annotations would "
            f"make the evaluation crash or score wrongly:\n  {listed}\nFix them in the JSON "
            f"(python tools/check_dataset.py {json_file} lists every problem)."
        )
    return problems
