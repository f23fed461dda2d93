"""Test-time scale search: the choice of the most confident rescaling, inputs resized with
the output size kept, and the SOIT option end to end (original coordinates, tiles, export)."""
import logging

import pytest
import torch

from soit import export
from soit.modeling.scale_search import check_test_scales, confidence, rescale_input, select_scale
from soit.modeling.transformer import TooFewTokensError
from conftest import separated_tiny_model, synthetic_sample, tiny_model


def test_confidence_is_the_mean_of_the_top_k_scores():
    scores = torch.tensor([0.5, 0.9, 0.2, 0.6])
    assert confidence(scores, 2) == pytest.approx(0.75)
    assert confidence(scores, 4) == pytest.approx(0.55)
    assert confidence(scores, 8) == pytest.approx(2.2 / 8)  # missing detections count as 0
    assert confidence(torch.zeros(0), 3) == 0.0


def test_the_most_confident_scale_is_chosen():
    sure = torch.tensor([0.95, 0.9, 0.9, 0.1])
    many_pieces = torch.tensor([0.8] * 40)  # an object cut into confident pieces: many, but less sure
    few = torch.tensor([0.99])
    assert select_scale([many_pieces, sure, few], 3) == 1
    assert select_scale([many_pieces, sure, few], 1) == 2
    assert select_scale([many_pieces, sure], 10) == 0  # over 10, the pieces' mass wins
    assert select_scale([sure, sure.clone()], 3) == 0  # the first of equals


@pytest.mark.parametrize(
    "scales,top_k,match",
    [([0.5, 0], 10, "positive"), ([1, 1.0], 10, "twice"), ("abc", 10, "list of positive numbers"),
     ([1, float("nan")], 10, "positive"), ([1, 2], 0, "test_scale_top_k"), ([1, 2], 2.5, "test_scale_top_k")],
)  # fmt: skip
def test_bad_settings_are_named(scales, top_k, match):
    with pytest.raises(ValueError, match=match):
        check_test_scales(scales, top_k)
    with pytest.raises(ValueError, match=match):
        tiny_model(test_scales=scales, test_scale_top_k=top_k)


def test_rescaled_input_keeps_the_output_size():
    image = torch.randint(0, 255, (3, 60, 90), dtype=torch.uint8)
    x = {"image": image, "file_name": "a.png"}
    half = rescale_input(x, 0.5)
    assert half["image"].shape == (3, 30, 45)
    assert (half["height"], half["width"]) == (60, 90) and half["file_name"] == "a.png"
    assert rescale_input({"image": image, "height": 120, "width": 180}, 2.0)["image"].shape == (3, 120, 180)
    assert (rescale_input({"image": image, "height": 120, "width": 180}, 2.0)["height"]) == 120
    same = rescale_input(x, 1.0)
    assert same["image"] is image and x == {"image": image, "file_name": "a.png"}  # the input is untouched
    # a constant image stays constant (no ringing from the resampling), shrinking and growing
    flat = torch.full((3, 40, 40), 77, dtype=torch.uint8)
    for factor in (0.3, 0.5, 2.0, 3.0):
        resized = rescale_input({"image": flat}, factor)["image"]
        torch.testing.assert_close(resized, torch.full_like(resized, 77.0))


# ------------------------------------------------------------------------ the SOIT option
def _image():
    shapes = [(0, 40, 50, 18, 22, (220, 60, 60)), (1, 100, 150, 16, 24, (60, 200, 90)), (0, 60, 170, 15, 15, (80, 80, 230))]
    return synthetic_sample(128, 200, shapes)["image"]


@pytest.fixture()
def model():
    m = separated_tiny_model()
    m.mask_threshold = 0.5
    return m


def _predict(model, inputs, **settings):
    saved = {k: getattr(model, k) for k in settings}
    try:
        for k, v in settings.items():
            setattr(model, k, v)
        with torch.no_grad():
            return model(inputs)
    finally:
        for k, v in saved.items():
            setattr(model, k, v)


def _same(a, b):
    return torch.equal(a.scores, b.scores) and torch.equal(a.pred_masks, b.pred_masks) and torch.equal(
        a.pred_boxes.tensor, b.pred_boxes.tensor
    )


def test_scale_one_is_the_plain_result(model):
    inputs = [{"image": _image(), "height": 256, "width": 400}]
    (plain,) = _predict(model, inputs)
    (searched,) = _predict(model, inputs, test_scales=(1.0,))
    assert _same(plain["instances"], searched["instances"])


def test_the_search_returns_the_most_confident_factor_in_the_original_size(model):
    image = _image()
    inputs = [{"image": image, "height": 256, "width": 400}, {"image": image.flip(-1)}]
    factors = (0.75, 1.0, 1.5)
    singles = [_predict(model, inputs, test_scales=(f,)) for f in factors]
    searched = _predict(model, inputs, test_scales=factors, test_scale_top_k=5)
    for i, size in enumerate([(256, 400), (128, 200)]):
        candidates = [s[i]["instances"] for s in singles]
        for inst in candidates:  # every factor answers in the original size
            assert inst.image_size == size and inst.pred_masks.shape[1:] == size
            boxes = inst.pred_boxes.tensor
            assert (boxes[:, 2] <= size[1]).all() and (boxes[:, 3] <= size[0]).all()
        values = [confidence(c.scores, 5) for c in candidates]
        best = max(range(len(values)), key=lambda j: values[j])
        assert _same(searched[i]["instances"], candidates[best])
    # the factors do give different detections, so the choice was a real one
    assert not _same(singles[0][0]["instances"], singles[2][0]["instances"])


def test_the_search_runs_tiles_at_each_factor(model):
    image = _image()
    inputs = [{"image": image}]
    tiled_double = _predict(model, inputs, test_scales=(2.0,), tile_size=128, tile_overlap=32)
    doubled = {"image": rescale_input(inputs[0], 2.0)["image"], "height": 128, "width": 200}
    plain_double = _predict(model, [doubled], tile_size=128, tile_overlap=32)
    assert _same(tiled_double[0]["instances"], plain_double[0]["instances"])
    assert tiled_double[0]["instances"].image_size == (128, 200)


def test_a_factor_too_small_for_the_model_is_skipped_and_logged(model, caplog):
    inputs = [{"image": _image()}]
    with caplog.at_level(logging.WARNING, logger="soit.modeling.meta_arch"):
        (searched,) = _predict(model, inputs, test_scales=(0.02, 1.0))
    assert any("test scale 0.02 skipped" in r.getMessage() for r in caplog.records)
    (plain,) = _predict(model, inputs)
    assert _same(searched["instances"], plain["instances"])
    with pytest.raises(TooFewTokensError, match="too small"):
        _predict(model, inputs, test_scales=(0.02, 0.03))


def test_export_traces_the_plain_model(model, tmp_path):
    image = _image()
    model.test_scales = (0.5, 2.0)
    try:
        _, names = export.export_torchscript(model, image, str(tmp_path / "model.ts"))
        with torch.no_grad():
            plain = model.inference([{"image": image}], do_postprocess=False)[0]
    finally:
        model.test_scales = ()
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    with torch.no_grad():
        got = export.instances_from_outputs(loaded(image), names)
    assert got.pred_masks.shape[-2:] == (128, 200)
    torch.testing.assert_close(got.scores, plain.scores, rtol=0, atol=1e-5)
