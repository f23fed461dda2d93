"""Checking a COCO-format instance dataset before spending time on it.

The problems found are those that make training drop data or fail (an image of another
size than the JSON says, once its EXIF orientation is applied; a truncated file), make
COCO evaluation crash (pycocotools on an empty polygon), never end (an RLE whose run
lengths do not cover its size) or lie (a NaN box inflates bbox AP), or make the model fail
on an image (fewer encoder tokens than queries). ``tools/check_dataset.py`` prints
them; ``train_net.py`` logs them for its training sets and refuses evaluation sets whose
ground truth would make COCO evaluation crash, never end or lie.
"""
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

__all__ = [
    "Problem",
    "check_coco_json",
    "check_registered_dataset",
    "encoder_tokens",
    "min_image_side",
    "read_coco_json",
    "rle_problem",
]

# feature strides of the encoder's levels (C3-C5 and one extra level)
ENCODER_STRIDES = (8, 16, 32, 64)
# EXIF orientations that PIL's exif_transpose (our reader) and detectron2's read_image undo
# with a transpose or a quarter turn: the image is read with width and height swapped
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION_TAG = 0x0112
# A run length of a compressed RLE takes at most 7 characters of 5 bits: pycocotools keeps
# them in 32 bits
_MAX_RLE_CHARS = 7


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


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _rle_string_counts(counts):
    """The run lengths (int64) of a compressed COCO RLE string, decoded as pycocotools'
    ``rleFrString`` does: characters '0'..'o' carry 5 bits each, a set 0x20 bit continues
    the run length, 0x10 on its last character extends the sign, and from the fourth run
    on each one is stored as the difference to the run two places before.

    Raises ``ValueError`` naming what is wrong when the string cannot be decoded.
    """
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError as e:
            raise ValueError(f"character {counts[e.start]!r} at {e.start} is not one of '0'..'o'") from e
    c = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return c
    bad = np.flatnonzero((c < 0) | (c > 63))
    if bad.size:
        raise ValueError(f"character {chr(c[bad[0]] + 48)!r} at {bad[0]} is not one of '0'..'o'")
    more = (c & 0x20) != 0
    if more[-1]:
        raise ValueError("the string ends inside a run length")
    group = np.concatenate(([0], np.cumsum(~more)[:-1]))  # the run length each character belongs to
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    k = np.arange(c.size) - starts[group]  # place of the character in its run length
    if k.max() >= _MAX_RLE_CHARS:
        raise ValueError(f"a run length takes more than {_MAX_RLE_CHARS} characters")
    x = np.zeros(ends.size, np.int64)
    np.add.at(x, group, (c & 0x1F) << (5 * k))
    negative = (c[ends] & 0x10) != 0
    x[negative] |= np.left_shift(-1, 5 * (k[ends][negative] + 1))
    if x.size > 3:
        x[3::2] = x[1] + np.cumsum(x[3::2])
        x[4::2] = x[2] + np.cumsum(x[4::2])
    return x


def rle_problem(segm, height, width):
    """What is wrong with a COCO RLE dict, or None. Run lengths that do not sum to h*w make
    pycocotools decode uninitialised memory or, in COCO evaluation, loop forever."""
    if "counts" not in segm or "size" not in segm:
        return "RLE without 'counts' and 'size'"
    size = segm["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v >= 0 for v in size)):
        return f"RLE size {size!r} is not [height, width] as two non-negative integers"
    if height is not None and size != [height, width]:
        return f"RLE size {size} differs from the image's [{height}, {width}]"
    h, w = size
    counts = segm["counts"]
    if isinstance(counts, list):
        kind = "uncompressed RLE"
        if not all(_is_int(v) and v >= 0 for v in counts):
            return f"{kind} counts are not all non-negative integers"
        total = sum(counts)
    elif isinstance(counts, (str, bytes)):
        kind = "compressed RLE"
        try:
            runs = _rle_string_counts(counts)
        except ValueError as e:
            return f"{kind} counts cannot be decoded: {e}"
        if (runs < 0).any():
            return f"{kind} counts decode to a negative run length ({int(runs.min())})"
        total = int(runs.sum())
    else:
        return f"RLE counts are a {type(counts).__name__}, expected a list of integers or a string"
    if total != h * w:
        return f"{kind} counts sum to {total}, but its size {h}x{w} needs h*w = {h * w}"
    return None


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
        return rle_problem(segm, height, width)
    return f"segmentation is a {type(segm).__name__}, expected polygons or RLE"


def check_coco_json(json_file, image_root=None, num_queries=0, check_files=True, decode=True) -> List[Problem]:
    """Every problem of a COCO instance-segmentation JSON (and its images, when
    ``image_root`` is given and ``check_files``): NaN/inf/negative boxes, empty or short
    polygons, RLEs whose run lengths do not cover their size, unknown categories and
    images, duplicate ids, images whose file is missing, unreadable or of another size than
    the JSON says (after its EXIF orientation, as the readers apply it), images with fewer
    encoder tokens than ``num_queries``.

    ``decode``: decode every image fully, so that a truncated or corrupt file is found
    before it fails a training run; ``False`` reads only the headers (size, orientation),
    much faster on a large set but blind to damaged pixel data.
    """
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
            problems.extend(_check_file(os.path.join(image_root, name), name, h, w, decode))
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


def _check_file(path, name, height, width, decode=True):
    if not os.path.isfile(path):
        return [Problem(name, None, f"the file {path} does not exist")]
    from PIL import Image, ImageFile

    # a truncated file is a problem even where PIL has been told to fill it in silently
    load_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            if decode:
                im.load()
            orientation = _exif_orientation(im, loaded=decode)
            stored_w, stored_h = im.size
    except Exception as e:  # any decoder error: the image is unusable either way
        return [Problem(name, None, f"the file {path} is not a readable image ({type(e).__name__}: {e})")]
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = load_truncated
    swapped = orientation in _SWAPPING_ORIENTATIONS
    w, h = (stored_h, stored_w) if swapped else (stored_w, stored_h)
    if (h, w) == (height, width):
        return []
    if not swapped:
        return [Problem(name, None, f"the file is {w}x{h} but the JSON says {width}x{height}", True)]
    what = (f"the file is {w}x{h} once its EXIF orientation {orientation} is applied (stored {stored_w}x{stored_h}), "
            f"but the JSON says {width}x{height}")  # fmt: skip
    if (stored_h, stored_w) == (height, width):
        what += f": images are read with their EXIF orientation applied, so the JSON should say {w}x{h}"
    return [Problem(name, None, what, True)]


def _exif_orientation(im, loaded):
    """The EXIF orientation (1-8, or whatever the tag holds) that the image readers apply.
    A PNG's eXIf chunk after the pixel data is only seen once the image is ``loaded``
    (PIL would decode it to look)."""
    if not loaded and im.format == "PNG" and "exif" not in im.info:
        return 1
    return im.getexif().get(_EXIF_ORIENTATION_TAG, 1)


def check_registered_dataset(name, evaluation=False, num_queries=0, max_logged=20):
    """Check a dataset registered with a COCO ``json_file`` (others are not checked) and log
    its problems naming the dataset, image and annotation; training goes on (the mapper
    drops what it cannot use, saying so). Image files are not opened: that takes a while on
    a large set (``tools/check_dataset.py`` checks them). ``num_queries``: also log images
    too small for that many queries at their size in the JSON (the test mapper may still
    resize them). With ``evaluation``, a ground truth that would make COCO evaluation crash,
    never end or lie raises ``ValueError`` instead, before any time is spent."""
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
            f"make the evaluation crash, never end or score wrongly:\n  {listed}\nFix them in the JSON "
            f"(python tools/check_dataset.py {json_file} lists every problem)."
        )
    return problems
