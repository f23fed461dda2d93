import json
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The project's shared reference material (the authors' key list and fixtures) lies beside
# the checkout; SOIT_SHARED_DIR points elsewhere.
SHARED = os.environ.get("SOIT_SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))


def shared_file(*parts):
    """Path of a file of the shared reference material; fails (never skips) when missing."""
    path = os.path.join(SHARED, *parts)
    if not os.path.isfile(path):
        pytest.fail(f"{path} is missing: these tests need the shared reference files (set SOIT_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def nuclei_wheel_cache(tmp_path_factory):
    """Where the stardist wheel holding the nuclei data is downloaded once per session."""
    return str(tmp_path_factory.getbasetemp() / "stardist-wheel")


@pytest.fixture(scope="session")
def nuclei(tmp_path_factory, nuclei_wheel_cache):
    """The quick-start nuclei dataset (soit/data/nuclei.py), prepared once per session: the dict of
    ``soit.data.nuclei.prepare_nuclei``. A failed download fails (no skip): PyPI is part of
    the test environment."""
    from soit.data.nuclei import prepare_nuclei

    return prepare_nuclei(str(tmp_path_factory.getbasetemp() / "nuclei"), cache_dir=nuclei_wheel_cache)


def write_synthetic_coco(root, num_images=4):
    """Small COCO-format dataset: coloured rectangles and ellipses with exact RLE masks."""
    from PIL import Image
    from pycocotools import mask as mask_util

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(num_images):
        h, w = 72, 88
        yy, xx = np.mgrid[:h, :w]
        img = np.full((h, w, 3), 20, np.uint8)
        for _ in range(2):
            cy, cx = rng.integers(18, h - 18), rng.integers(18, w - 18)
            ry, rx = rng.integers(8, 16), rng.integers(8, 16)
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            img[m] = rng.integers(80, 255, 3)
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            x, y, bw, bh = mask_util.toBbox(rle).tolist()
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "segmentation": rle,
                 "bbox": [x, y, bw, bh], "area": float(m.sum()), "iscrowd": 0}
            )
        name = f"img{i}.png"
        Image.fromarray(img).save(os.path.join(root, "images", name))
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    with open(os.path.join(root, "train.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "blob"}]}, f)


def register_synthetic(name, root, num_images=4):
    """:func:`write_synthetic_coco` under ``root``, registered as ``name`` (an earlier
    registration of that name is replaced)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    write_synthetic_coco(root, num_images=num_images)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, os.path.join(root, "train.json"), os.path.join(root, "images"))
    return name


def dataset_overrides(train=None, test=None):
    """Config overrides that train and/or evaluate the quick-start config on registered datasets."""
    out = [f"dataloader.train.dataset.names={train}"] if train else []
    if test:
        out += [f"dataloader.test.dataset.names={test}", f"dataloader.evaluator.dataset_name={test}"]
    return out


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """A clean one-class COCO dataset (4 images), registered as "test_synthetic"."""
    return register_synthetic("test_synthetic", str(tmp_path_factory.mktemp("synthetic")))


def check_registration(register, root, names, num_images, num_instances, elsewhere):
    """``register(root, names=names)`` registers the train/val splits of a prepared shipped
    dataset: idempotent, ``num_images`` and ``num_instances`` (train, val), every file
    present, class "nucleus" at contiguous id 0 (COCO id 1), COCO evaluation; registering
    the names again with other files (``elsewhere``) is refused. The names are removed after."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    try:
        register(root, names=names)
        register(root, names=names)  # same files: silently skipped
        splits = [DatasetCatalog.get(n) for n in names]
        assert [len(d) for d in splits] == list(num_images)
        assert [sum(len(x["annotations"]) for x in d) for d in splits] == list(num_instances)
        assert {a["category_id"] for d in splits for x in d for a in x["annotations"]} == {0}
        assert all(os.path.isfile(x["file_name"]) for d in splits for x in d)
        assert MetadataCatalog.get(names[0]).thing_classes == ["nucleus"]
        assert MetadataCatalog.get(names[1]).evaluator_type == "coco"
        with pytest.raises(ValueError, match="already registered"):
            register(elsewhere, names=names)
    finally:
        for name in names:
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)
