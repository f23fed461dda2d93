"""Class names of a registered dataset without loading its images or annotations."""
import json

from detectron2.data import MetadataCatalog

__all__ = ["dataset_metadata"]


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
