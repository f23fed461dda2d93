#!/usr/bin/env python
"""Check a COCO-format instance dataset before training or evaluating on it.

    python tools/check_dataset.py path/to/train.json --image-root path/to/images
    python tools/check_dataset.py my_train            # a dataset registered in this process
    python tools/check_dataset.py nuclei_val --num-queries 100   # a shipped dataset, once prepared

Lists every problem (image, annotation id, what is wrong): NaN/inf or negative boxes, empty
or short polygons, RLEs whose run lengths do not sum to height*width (COCO evaluation never
ends on them) or cannot be decoded, unknown categories and images, duplicate ids, image
files that are missing, unreadable (truncated or corrupt) or of another size than the JSON
says once their EXIF orientation is applied, as training reads them, images too small for
the model's number of queries. Exit status 0 when there is none, 1 otherwise.

Every image is decoded in full by default: a truncated file has an intact header, and
would otherwise pass here and fail in the middle of training. --fast reads only the
headers (size, EXIF orientation), for a quick pass over a large set.
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve(dataset, image_root):
    """(json_file, image_root) of a JSON path or a registered dataset name."""
    if dataset.endswith(".json") or os.path.isfile(dataset):
        return dataset, image_root
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from soit.data.hela import register_hela
    from soit.data.nuclei import register_nuclei

    shipped = {"nuclei_": (register_nuclei, "nuclei"), "hela_": (register_hela, "hela")}  # prepared by their tools
    for prefix, (register, folder) in shipped.items():
        root = os.path.join(REPO, "datasets", folder)
        if dataset.startswith(prefix) and dataset not in DatasetCatalog.list() and os.path.isdir(root):
            register(root)
    if dataset not in DatasetCatalog.list():
        raise SystemExit(f"{dataset!r} is neither a JSON file nor a registered dataset")
    meta = MetadataCatalog.get(dataset)
    if not meta.get("json_file"):
        raise SystemExit(f"dataset {dataset!r} has no json_file in its metadata: only COCO-format datasets are checked")
    return meta.json_file, image_root or meta.get("image_root")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="a COCO JSON file or the name of a registered dataset")
    parser.add_argument("--image-root", help="folder of the images (default: the registered dataset's)")
    parser.add_argument("--num-queries", type=int, default=100, help="the model's queries (0: no size check)")
    parser.add_argument("--max-lines", type=int, default=200, help="problems printed at most (all are counted)")
    parser.add_argument(
        "--fast", action="store_true",
        help="read only the image headers (size, EXIF orientation), not the pixels: much faster on a large set, "
        "but a truncated or corrupt file passes (default: decode every image, as training will)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    from soit.data.check import check_coco_json, read_coco_json

    json_file, image_root = resolve(args.dataset, args.image_root)
    try:
        problems = check_coco_json(json_file, image_root, num_queries=args.num_queries, decode=not args.fast)
        data = read_coco_json(json_file)
    except (OSError, ValueError) as e:
        print(f"error: {e}")
        return 1
    counts = (f"{len(data['images'])} images, {len(data.get('annotations') or [])} annotations, "
              f"{len(data.get('categories') or [])} categories")  # fmt: skip
    if image_root is None:
        counts += "; image files not checked (give --image-root)"
    elif args.fast:
        counts += "; image headers only (--fast)"
    if not problems:
        print(f"OK {json_file}: {counts}, no problems")
        return 0
    for p in problems[: args.max_lines]:
        print(f"{json_file}: {p}")
    if len(problems) > args.max_lines:
        print(f"... and {len(problems) - args.max_lines} more")
    breaking = sum(p.breaks_evaluation for p in problems)
    print(f"FAILED {json_file}: {counts}; {len(problems)} problems "
          f"({breaking} would make COCO evaluation crash, never end or lie)")  # fmt: skip
    return 1


if __name__ == "__main__":
    sys.exit(main())
