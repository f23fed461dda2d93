"""SOITDatasetMapper on the real nuclei annotations and on deliberately bad inputs."""
import copy
import logging
import os
import pickle

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
from detectron2.data import transforms as T
from detectron2.data.samplers import TrainingSampler
from detectron2.structures import BoxMode
from PIL import Image

from soit.data import (
    RandomRotation90,
    Rot90Transform,
    SOITDatasetMapper,
    detr_augmentations,
    mask_to_box,
    register_nuclei,
)

MAPPER_LOGGER = "soit.data.dataset_mapper"


@pytest.fixture
def log(caplog):
    """caplog attached to the mapper's logger itself, so that it also sees records when a
    logging set-up elsewhere stops propagation to the root logger."""
    logger = logging.getLogger(MAPPER_LOGGER)
    old = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # each record once, whatever handlers the root logger has
    yield caplog
    logger.setLevel(old[0])
    logger.propagate = old[1]
    logger.removeHandler(caplog.handler)


def _tight_box(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


# ----------------------------------------------------------------- real annotations
@pytest.fixture(scope="module")
def nuclei_val(nuclei):
    info = nuclei
    names = ("test_mapper_nuclei_train", "test_mapper_nuclei_val")
    register_nuclei(os.path.dirname(info["train_json"]), names=names)
    (record,) = DatasetCatalog.get(names[1])
    yield record
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _flip_rot(array, flip, k):
    if flip:
        array = array[:, ::-1]
    return np.rot90(array, k, axes=(0, 1))


def test_masks_and_boxes_match_coco_annotations(nuclei_val):
    mapper = SOITDatasetMapper(True, augmentation=[])
    out = mapper(nuclei_val)
    inst = out["instances"]
    expected = np.stack([mask_util.decode(a["segmentation"]) for a in nuclei_val["annotations"]]).astype(bool)
    assert len(inst) == 29 and inst.image_size == (512, 512)
    assert torch.equal(inst.gt_masks.tensor, torch.from_numpy(expected))
    assert torch.equal(inst.gt_classes, torch.zeros(29, dtype=torch.int64))
    coco_xyxy = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in nuclei_val["annotations"]]
    assert inst.gt_boxes.tensor.tolist() == coco_xyxy == [_tight_box(m) for m in expected]
    image = np.array(Image.open(nuclei_val["file_name"]).convert("RGB"))
    assert torch.equal(out["image"], torch.from_numpy(image).permute(2, 0, 1))
    assert (out["height"], out["width"]) == (512, 512)
    assert mapper.num_kept == 29 and not mapper.dropped


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_flip_and_rot90_move_image_and_masks_together(nuclei_val, flip, k):
    augs = ([T.RandomFlip(prob=1.0)] if flip else []) + [RandomRotation90(ks=(k,))]
    out = SOITDatasetMapper(True, augmentation=augs)(nuclei_val)
    image = np.asarray(Image.open(nuclei_val["file_name"]).convert("RGB"))
    masks = [mask_util.decode(a["segmentation"]) for a in nuclei_val["annotations"]]
    assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), _flip_rot(image, flip, k))
    inst = out["instances"]
    for got, mask, box in zip(inst.gt_masks.tensor.numpy(), masks, inst.gt_boxes.tensor.tolist()):
        assert np.array_equal(got, _flip_rot(mask, flip, k).astype(bool))
        assert box == _tight_box(got)
    # Boxes moved as geometry (corners through apply_coords) agree with the moved masks.
    tfm = T.AugmentationList(augs)(T.AugInput(image))
    coco = np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in nuclei_val["annotations"]])
    assert np.allclose(tfm.apply_box(coco), inst.gt_boxes.tensor.numpy())


def test_rot90_transform_coords_inverse_and_polygons():
    h, w = 3, 5
    for k in range(4):
        tfm = Rot90Transform(h, w, k)
        for r, c in [(0, 0), (2, 4), (1, 3)]:
            img = np.zeros((h, w), np.uint8)
            img[r, c] = 1
            (rr,), (cc,) = np.nonzero(tfm.apply_image(img))
            assert np.allclose(tfm.apply_coords(np.array([[c + 0.5, r + 0.5]])), [[cc + 0.5, rr + 0.5]])
        img = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)
        assert np.array_equal(tfm.inverse().apply_image(tfm.apply_image(img)), img)
        pts = np.array([[0.0, 0.0], [5.0, 3.0], [1.5, 2.25]])
        assert np.allclose(tfm.inverse().apply_coords(tfm.apply_coords(pts)), pts)


def test_detr_recipe_on_real_data(nuclei_val):
    aug, aug_crop = detr_augmentations(
        min_sizes=(256, 288, 320), max_size=400, crop_min_sizes=(300, 400), crop_size=(160, 240),
        extra=[RandomRotation90()],
    )
    mapper = SOITDatasetMapper(True, augmentation=aug, augmentation_with_crop=aug_crop)
    np.random.seed(0)
    counts = set()
    for _ in range(8):
        out = mapper(nuclei_val)
        _, h, w = out["image"].shape
        inst = out["instances"]
        assert min(h, w) in (256, 288, 320) and max(h, w) <= 400 and inst.image_size == (h, w)
        assert inst.gt_masks.tensor.shape == (len(inst), h, w) and len(inst) > 0
        for mask, box in zip(inst.gt_masks.tensor.numpy(), inst.gt_boxes.tensor.tolist()):
            assert box == _tight_box(mask)
        counts.add(len(inst))
    assert 29 in counts and min(counts) < 29, "both branches (full image and crop) were taken"
    # The default recipe of the paper (docs/model.md, section 8).
    full, crop = detr_augmentations()
    assert isinstance(full[0], T.RandomFlip) and full[-1].short_edge_length == list(range(480, 801, 32))
    assert full[-1].max_size == 1333 and crop[1].short_edge_length == [400, 500, 600]
    assert crop[2].crop_type == "absolute_range" and tuple(crop[2].crop_size) == (384, 600)


# ----------------------------------------------------------------- bad inputs
def _uncompressed_rle(mask):
    """COCO uncompressed RLE: column-major run lengths, starting with a run of zeros."""
    flat = mask.ravel(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": ([0] + runs) if flat[0] else runs}


SQUARE = [[10.0, 10.0, 20.0, 10.0, 20.0, 20.0, 10.0, 20.0]]


def _ann(segmentation, bbox, **kw):
    return {"segmentation": segmentation, "bbox": bbox, "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, **kw}


@pytest.fixture
def bad_dataset(tmp_path):
    """Small dataset dicts, each with a problem; images 40 x 60 (H x W) written with PIL."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    files = {
        "rgb": Image.fromarray(rgb),
        "gray": Image.fromarray(rgb[..., 0]),
        "rgba": Image.fromarray(np.dstack([rgb, np.full((40, 60), 7, np.uint8)])),
        "palette": Image.fromarray(rgb).convert("P"),
        "gray16": Image.fromarray((rng.integers(0, 65536, (40, 60))).astype(np.uint16)),
    }
    dicts = {}
    for name, img in files.items():
        path = str(tmp_path / f"{name}.png")
        img.save(path)
        dicts[name] = {"file_name": path, "image_id": name, "height": 40, "width": 60,
                       "annotations": [_ann(SQUARE, [10, 10, 10, 10])]}
    crowd = np.zeros((40, 60), np.uint8)
    crowd[25:35, 30:50] = 1
    dicts["rgb"]["annotations"] += [
        _ann(_uncompressed_rle(crowd), [30, 25, 20, 10], iscrowd=1),
        _ann([[5.0, 5.0, 5.0, 13.0, 5.0, 9.0]], [5, 5, 0, 8]),  # a line: zero-area box
        _ann([], [40, 5, 6, 6]),  # empty polygon list
        _ann(SQUARE, [10, 10, float("nan"), 10]),  # NaN compares false: must not pass as a box
    ]
    dicts["no_annotations"] = dict(dicts["rgb"], image_id="none", annotations=[])
    dicts["corrupt"] = {"file_name": str(tmp_path / "corrupt.png"), "image_id": "corrupt", "height": 40, "width": 60,
                        "annotations": [_ann(SQUARE, [10, 10, 10, 10])]}
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    whole = (tmp_path / "rgb.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    dicts["truncated"] = dict(dicts["corrupt"], file_name=str(tmp_path / "truncated.png"), image_id="truncated")
    return dicts, rgb


def test_bad_annotations_are_dropped_and_named_in_the_log(bad_dataset, log):
    dicts, _ = bad_dataset
    mapper = SOITDatasetMapper(True, augmentation=[])
    inst = mapper(dicts["rgb"])["instances"]
    assert len(inst) == 1 and inst.gt_boxes.tensor.tolist() == [[10, 10, 20, 20]]
    assert dict(mapper.dropped) == {"crowd": 1, "degenerate_box": 2, "empty_mask": 1}
    (warning,) = [r for r in log.records if r.levelno == logging.WARNING]
    for text in ("rgb.png", "kept 1 of 5", "crowd: 1", "degenerate_box: 2", "empty_mask: 1"):
        assert text in warning.getMessage()
    assert "crowd: 1" in mapper.summary() and "1 annotations kept" in mapper.summary()
    # The same file next epoch: counted again, but not warned about again.
    log.clear()
    mapper(dicts["rgb"])
    assert mapper.dropped["crowd"] == 2 and not [r for r in log.records if r.levelno >= logging.WARNING]
    assert any("rgb.png" in r.getMessage() for r in log.records if r.levelno == logging.DEBUG)
    assert dicts["rgb"]["annotations"][1]["iscrowd"] == 1 and "image" not in dicts["rgb"], "input left unchanged"


def test_images_lost_to_augmentation_are_expected_drops(bad_dataset, log):
    dicts, _ = bad_dataset
    mapper = SOITDatasetMapper(True, augmentation=[T.CropTransform(30, 0, 30, 40)])  # the square lies left of x=30
    inst = mapper(dicts["gray"])["instances"]
    assert len(inst) == 0 and mapper.dropped == {"lost_in_augmentation": 1}
    assert not [r for r in log.records if r.levelno >= logging.WARNING]
    assert any("lost_in_augmentation: 1" in r.getMessage() for r in log.records)


def test_grayscale_rgba_palette_and_16bit_images_become_rgb(bad_dataset):
    dicts, rgb = bad_dataset
    mapper = SOITDatasetMapper(True, augmentation=[])
    images = {name: mapper(dicts[name])["image"].permute(1, 2, 0).numpy() for name in dicts if name in
              ("rgb", "gray", "rgba", "palette", "gray16")}
    for name, image in images.items():
        assert image.shape == (40, 60, 3) and image.dtype == np.uint8, name
    assert np.array_equal(images["rgb"], rgb) and np.array_equal(images["rgba"], rgb)
    assert np.array_equal(images["gray"], np.repeat(rgb[..., :1], 3, axis=2))
    palette = np.asarray(Image.open(dicts["palette"]["file_name"]).convert("RGB"))
    assert np.array_equal(images["palette"], palette)
    # PIL alone would clip 16-bit values at 255; they are scaled from the 16-bit range.
    raw = np.asarray(Image.open(dicts["gray16"]["file_name"])).astype(np.float64)
    assert np.array_equal(images["gray16"][..., 0], np.round(raw * 255 / 65535).astype(np.uint8))
    bgr = SOITDatasetMapper(True, augmentation=[], image_format="BGR")(dicts["rgb"])["image"]
    assert np.array_equal(bgr.permute(1, 2, 0).numpy(), rgb[..., ::-1])


def test_image_without_annotations_gives_empty_instances(bad_dataset):
    dicts, _ = bad_dataset
    mapper = SOITDatasetMapper(True, augmentation=[T.ResizeTransform(40, 60, 20, 30)])
    for record in (dicts["no_annotations"], {k: v for k, v in dicts["no_annotations"].items() if k != "annotations"}):
        inst = mapper(record)["instances"]
        assert inst.image_size == (20, 30) and len(inst) == 0
        assert inst.gt_boxes.tensor.shape == (0, 4) and inst.gt_classes.shape == (0,)
        assert inst.gt_classes.dtype == torch.int64 and inst.gt_masks.tensor.shape == (0, 20, 30)


@pytest.mark.parametrize("name", ["corrupt", "truncated"])
def test_unreadable_image_gives_none_and_a_warning(bad_dataset, log, name):
    dicts, _ = bad_dataset
    mapper = SOITDatasetMapper(True, augmentation=[])
    assert mapper(dicts[name]) is None and mapper.num_unreadable == 1
    warnings = [r.getMessage() for r in log.records if r.levelno == logging.WARNING]
    assert any(dicts[name]["file_name"] in m and "cannot read" in m for m in warnings)
    # Evaluation must not swap images silently: there it is an error naming the file.
    with pytest.raises(RuntimeError, match=f"{name}.png"):
        SOITDatasetMapper(False, augmentation=[])(dicts[name])


def test_missing_file_is_an_error(bad_dataset):
    dicts, _ = bad_dataset
    with pytest.raises(FileNotFoundError):
        SOITDatasetMapper(True, augmentation=[])(dict(dicts["rgb"], file_name="/nonexistent/x.png"))


def test_train_loader_goes_on_past_a_corrupt_image(bad_dataset, log):
    dicts, _ = bad_dataset
    dataset = [dicts[n] for n in ("corrupt", "rgb", "gray", "rgba", "palette", "no_annotations")]
    mapper = SOITDatasetMapper(True, augmentation=[T.RandomFlip()])
    loader = build_detection_train_loader(
        dataset=dataset, mapper=mapper, sampler=TrainingSampler(len(dataset), seed=0), total_batch_size=2,
        num_workers=0,
    )
    seen = []
    for _, batch in zip(range(8), loader):
        assert len(batch) == 2
        seen += [d["file_name"] for d in batch]
    assert mapper.num_unreadable >= 1 and dicts["corrupt"]["file_name"] not in seen
    assert any("corrupt.png" in r.getMessage() for r in log.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("size", [6, 40])  # random.sample lists small populations, indexes large ones
def test_map_dataset_replaces_failed_samples(size):
    from detectron2.data.common import MapDataset

    from soit.data import patch_map_dataset_fallback

    patch_map_dataset_fallback()  # what building a SOITDatasetMapper does
    patch_map_dataset_fallback()  # idempotent
    dataset = MapDataset(list(range(size)), lambda i: None if i % 2 else i)
    dataset = pickle.loads(pickle.dumps(dataset))  # as data loader workers receive it
    assert all(dataset[i] % 2 == 0 for i in range(size))


@pytest.mark.parametrize("category_id", [3, -1, "0", 1.0])
def test_category_ids_must_be_contiguous(bad_dataset, category_id):
    dicts, _ = bad_dataset
    record = copy.deepcopy(dicts["rgb"])
    record["annotations"][0]["category_id"] = category_id
    with pytest.raises(ValueError, match="contiguous class id"):
        SOITDatasetMapper(True, augmentation=[], num_classes=3)(record)


@pytest.mark.parametrize("augmentation", [[], [T.HFlipTransform(60), T.ResizeTransform(40, 60, 57, 83)]])
def test_polygon_and_rle_give_the_same_mask(bad_dataset, augmentation):
    dicts, _ = bad_dataset
    polygon = [[12.5, 8.0, 31.0, 14.0, 27.0, 33.5, 14.0, 29.0, 9.0, 18.0]]
    decoded = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygon, 40, 60)))
    compressed = mask_util.encode(np.asfortranarray(decoded))
    as_text = {"size": [40, 60], "counts": compressed["counts"].decode("ascii")}
    record = dict(dicts["rgb"], annotations=[
        _ann(polygon, [9, 8, 22, 25.5]),
        _ann(as_text, [9, 8, 22, 25.5]),
        _ann(compressed, [9, 8, 22, 25.5]),
        _ann(_uncompressed_rle(decoded), [9, 8, 22, 25.5]),
    ])
    masks = SOITDatasetMapper(True, augmentation=augmentation)(record)["instances"].gt_masks.tensor
    assert len(masks) == 4 and decoded.sum() > 100
    for mask in masks[1:]:
        assert torch.equal(mask, masks[0])
    if not augmentation:
        assert torch.equal(masks[0], torch.from_numpy(decoded.astype(bool)))


def test_boxes_from_annotations_when_not_recomputed(bad_dataset):
    dicts, _ = bad_dataset
    record = dict(dicts["rgb"], annotations=[_ann(SQUARE, [9.5, 10, 11, 10])])
    mapper = SOITDatasetMapper(True, augmentation=[T.HFlipTransform(60)], recompute_boxes=False)
    assert mapper(record)["instances"].gt_boxes.tensor.tolist() == [[39.5, 10, 50.5, 20]]
    recomputed = SOITDatasetMapper(True, augmentation=[T.HFlipTransform(60)])(record)["instances"]
    mask = recomputed.gt_masks.tensor[0].numpy()
    assert recomputed.gt_boxes.tensor.tolist() == [_tight_box(mask)] and mask_to_box(mask).tolist() == _tight_box(mask)


def test_eval_mode_keeps_original_size_and_needs_no_annotations(bad_dataset):
    dicts, _ = bad_dataset
    mapper = SOITDatasetMapper(False, augmentation=[T.ResizeShortestEdge(80, max_size=200)])
    record = {k: v for k, v in dicts["rgb"].items() if k != "annotations"}
    out = mapper(record)
    assert out["image"].shape == (3, 80, 120) and (out["height"], out["width"]) == (40, 60)
    assert "instances" not in out and "annotations" not in out
    assert "annotations" not in mapper(dicts["rgb"])


def test_rles_whose_runs_do_not_cover_the_image_are_dropped_not_decoded():
    """pycocotools decodes a short RLE from memory it never wrote: a silently wrong mask."""
    from soit.data.dataset_mapper import INVALID_RLE, decode_segmentation

    good = mask_util.encode(np.asfortranarray(np.pad(np.ones((3, 4), np.uint8), ((2, 1), (3, 2)))))
    mask, reason = decode_segmentation({"size": [6, 9], "counts": good["counts"].decode()}, 6, 9)
    assert reason is None and mask.sum() == 12
    short = {"size": [6, 9], "counts": [20, 12]}  # covers 32 of 54 pixels
    assert decode_segmentation(short, 6, 9) == (None, INVALID_RLE)
    longer = mask_util.encode(np.asfortranarray(np.ones((7, 9), np.uint8)))  # 63 pixels in a 6x9 RLE
    assert decode_segmentation({"size": [6, 9], "counts": longer["counts"]}, 6, 9) == (None, INVALID_RLE)
