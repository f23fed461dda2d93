"""Tiled inference: windows, merging across tile borders, and the SOIT option end to end."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from soit import export
from soit.modeling.tiling import TileDetections, merge_tile_detections, tile_windows, tiled_predict
from conftest import separated_tiny_model, synthetic_sample, tiny_model


@pytest.mark.parametrize("size,tile,overlap", [((200, 260), 96, 40), ((96, 300), 128, 32), ((64, 64), 96, 16)])
def test_windows_cover_the_image_with_the_overlap(size, tile, overlap):
    h, w = size
    windows = tile_windows(h, w, tile, overlap)
    covered = torch.zeros(h, w, dtype=torch.int64)
    for y0, x0, y1, x1 in windows:
        assert (y1 - y0, x1 - x0) == (min(tile, h), min(tile, w))
        assert 0 <= y0 and 0 <= x0 and y1 <= h and x1 <= w
        covered[y0:y1, x0:x1] += 1
    assert (covered > 0).all()
    ys, xs = sorted({wd[0] for wd in windows}), sorted({wd[1] for wd in windows})
    for starts, side in ((ys, min(tile, h)), (xs, min(tile, w))):
        for a, b in zip(starts, starts[1:]):
            assert a + side - b >= overlap  # neighbours overlap by at least `overlap`


def test_bad_tile_settings_are_named():
    with pytest.raises(ValueError, match="tile overlap"):
        tile_windows(100, 100, 64, 64)
    with pytest.raises(ValueError, match="tile_overlap"):
        tiny_model(tile_size=64, tile_overlap=80)


# ------------------------------------------------------ a translation-equivariant detector
def blob_image(h, w, blobs):
    """(1, h, w) image of discs/bars with distinct intensities: (cy, cx, ry, rx, value)."""
    yy, xx = np.mgrid[:h, :w]
    image = np.zeros((h, w), np.float32)
    for cy, cx, ry, rx, value in blobs:
        image[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = value
    return torch.from_numpy(image)[None]


def blob_detector(tiles):
    """One detection per connected blob, scored by its intensity (translation-equivariant)."""
    out = []
    for tile in tiles:
        labels, n = ndimage.label(tile[0].numpy() > 0)
        masks = torch.from_numpy(np.stack([labels == i for i in range(1, n + 1)]) if n else np.zeros((0, *labels.shape), bool))
        scores = torch.tensor([float(tile[0][m].mean()) for m in masks], dtype=torch.float32)
        boxes = []
        for m in masks:
            ys, xs = m.nonzero(as_tuple=True)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        boxes = torch.tensor(boxes, dtype=torch.float32).view(-1, 4)
        out.append(TileDetections(scores, torch.zeros(n, dtype=torch.long), boxes, masks))
    return out


def as_set(result):
    return sorted((round(float(s), 4), tuple(b.tolist()), int(m.sum())) for s, b, m in zip(result["scores"], result["boxes"], result["masks"]))


def test_tiles_give_the_instances_of_one_pass():
    # blobs away from the image border; several cross the tile borders (tiles 96, overlap 40,
    # so windows start at 0, 56, 104 in y and 0, 56, 112, 164 in x)
    blobs = [(30, 30, 12, 12, 0.9), (60, 100, 14, 10, 0.8), (150, 60, 10, 15, 0.7), (100, 200, 12, 12, 0.6),
             (170, 230, 9, 9, 0.5), (95, 140, 13, 13, 0.4)]  # fmt: skip
    image = blob_image(200, 260, blobs)
    one_pass = blob_detector(image[None])[0]
    expected = merge_tile_detections([one_pass], [(0, 0, 200, 260)], (200, 260))
    tiled = tiled_predict(image, blob_detector, tile_size=96, overlap=40, batch_size=3)
    assert len(tiled["scores"]) == len(blobs)
    assert as_set(tiled) == as_set(expected)
    # identical masks in the image's coordinates, each object once
    order = torch.argsort(expected["scores"], descending=True)
    assert torch.equal(tiled["masks"], expected["masks"][order])
    assert tiled["masks"].shape == (len(blobs), 200, 260)


def test_object_crossing_a_border_comes_out_once_and_whole():
    # a disc centred on the overlap between the two tiles of a 96 x 160 image (tiles 96,
    # overlap 32: x windows [0, 96) and [64, 160)) and one cut by the first tile's right side
    image = blob_image(96, 160, [(48, 80, 12, 12, 0.9), (30, 100, 10, 10, 0.8)])
    tiled = tiled_predict(image, blob_detector, tile_size=96, overlap=32)
    full = blob_detector(image[None])[0]
    assert len(tiled["scores"]) == 2
    for m in full.masks:
        assert any(torch.equal(m, t) for t in tiled["masks"]), "an object came out cut or shifted"


def test_objects_larger_than_the_overlap_are_united():
    # a bar longer than a tile: cut in every tile, its parts are united into the whole bar
    image = blob_image(64, 300, [(32, 150, 8, 120, 0.9)])
    tiled = tiled_predict(image, blob_detector, tile_size=96, overlap=24)
    assert len(tiled["scores"]) == 1
    assert torch.equal(tiled["masks"][0], image[0] > 0)
    assert tiled["boxes"][0].tolist() == [30.0, 24.0, 271.0, 41.0]


def test_same_tile_detections_are_never_merged():
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[:, 8:20, 8:20] = True
    det = TileDetections(torch.tensor([0.9, 0.8]), torch.zeros(2, dtype=torch.long), torch.tensor([[8.0, 8, 20, 20]] * 2), masks)
    merged = merge_tile_detections([det], [(0, 0, 32, 32)], (32, 32))
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.8])


# ------------------------------------------------------------------------ the SOIT option
def _image():
    shapes = [(0, 40, 50, 18, 22, (220, 60, 60)), (1, 100, 150, 16, 24, (60, 200, 90)), (0, 60, 170, 15, 15, (80, 80, 230))]
    return synthetic_sample(128, 200, shapes)["image"]


@pytest.fixture(scope="module")
def model():
    return separated_tiny_model()


def test_soit_tiled_inference_in_the_original_size(model):
    image = _image()
    model.tile_size, model.tile_overlap = 96, 32
    try:
        with torch.no_grad():
            (out,) = model([{"image": image, "height": 256, "width": 400}])
    finally:
        model.tile_size = 0
    inst = out["instances"]
    assert inst.image_size == (256, 400)
    assert inst.pred_masks.shape[1:] == (256, 400) and inst.pred_masks.dtype == torch.bool
    assert 0 < len(inst) <= model.max_detections
    assert (inst.scores[:-1] >= inst.scores[1:]).all()
    boxes = inst.pred_boxes.tensor
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 400).all() and (boxes[:, 3] <= 256).all()


def test_soit_image_smaller_than_a_tile_is_predicted_in_a_tile_sized_canvas(model):
    """The model sees an input of the tile's size: the image at the top left of a canvas of its
    mean colour; the detections centred in the image are kept, cropped to it."""
    image = _image()
    h, w = image.shape[-2:]
    canvas = image.float().mean(dim=(1, 2), keepdim=True).expand(3, 256, 256).to(image.dtype).clone()
    canvas[:, :h, :w] = image
    with torch.no_grad():
        (whole,) = model([{"image": canvas}])
        model.tile_size = 256
        try:
            (tiled,) = model([{"image": image}])
        finally:
            model.tile_size = 0
    whole, tiled = whole["instances"], tiled["instances"]
    centres = whole.pred_boxes.get_centers()
    inside = (centres[:, 0] < w) & (centres[:, 1] < h) & whole.pred_masks[:, :h, :w].flatten(1).any(1)
    assert tiled.image_size == (h, w) and inside.sum() < len(whole)
    assert torch.equal(tiled.scores, whole.scores[inside])
    assert torch.equal(tiled.pred_masks, whole.pred_masks[inside][:, :h, :w])


def test_export_traces_the_untiled_model(model, tmp_path):
    image = _image()
    model.tile_size = 64
    try:
        _, names = export.export_torchscript(model, image, str(tmp_path / "model.ts"))
        with torch.no_grad():
            untiled = model.inference([{"image": image}], do_postprocess=False)[0]
    finally:
        model.tile_size = 0
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    with torch.no_grad():
        got = export.instances_from_outputs(loaded(image), names)
    assert got.pred_masks.shape[-2:] == (128, 200)  # one pass over the whole image
    torch.testing.assert_close(got.scores, untiled.scores, rtol=0, atol=1e-5)
