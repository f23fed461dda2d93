"""Registered COCO datasets: registering once, and their class names without loading them."""
import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["dataset_metadata", "register_coco_once"]


def register_coco_once(name, json_file, image_root, metadata=None):
    """``register_coco_instances(name, metadata, json_file, image_root)``, idempotent: a name
    already registered with the same files (same real paths) is left alone; one registered
    with other files raises ``ValueError`` (re-registering would silently change what a
    running experiment reads)."""
    from detectron2.data.datasets import register_coco_instances

    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        registered = (meta.get("json_file"), meta.get("image_root"))
        same = all(
            p is not None and os.path.realpath(p) == os.path.realpath(q)
            for p, q in zip(registered, (json_file, image_root))
        )
        if same:
            return
        raise ValueError(
            f"dataset {name!r} is already registered with json_file={registered[0]!r}, image_root={registered[1]!r}, "
            f"not with {json_file!r}, {image_root!r}; use another name or remove the old registration first"
        )
    register_coco_instances(name, dict(metadata or {}), json_file, image_root)


def dataset_metadata(name):
    """``MetadataCatalog.get(name)`` with ``thing_classes`` filled in.

    detectron2 sets the class names of a dataset registered with ``register_coco_instances``
    only when the dataset is loaded; evaluation-only runs, the Predictor and the demo never load
    it. This reads the categories of the dataset's ``json_file`` instead, in the order
    ``load_coco_json`` gives them (sorted by category id), so a later load agrees."""
    meta = MetadataCatalog.get(name)
    if meta.get("thing_classes") is None and meta.get("json_file"):
        try:
            with open(meta.json_file) as f:
                categories = json.load(f).get("categories")
        except (OSError, ValueError) as e:
            raise ValueError(f"dataset {name!r}: cannot read the categories of {meta.json_file}: {e}") from e
        if not isinstance(categories, list) or not all(isinstance(c, dict) and "id" in c for c in categories):
            raise ValueError(f"dataset {name!r}: {meta.json_file} has no valid 'categories' list")
        categories = sorted(categories, key=lambda c: c["id"])
        meta.thing_classes = [str(c.get("name", c["id"])) for c in categories]
        meta.thing_dataset_id_to_contiguous_id = {c["id"]: i for i, c in enumerate(categories)}
    return meta
