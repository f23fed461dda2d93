"""SOIT(reference_size=...): encodings, proposal sizes and box deltas in units of a fixed
size in pixels instead of fractions of each image (docs/scale.md)."""
import math

import pytest
import torch
from detectron2.utils.events import EventStorage

from soit.layers.position_encoding import sine_position_encoding
from soit.modeling.box_ops import apply_box_delta
from soit.modeling.mask_head import mask_position_encoding as mask_sine_encoding
from conftest import synthetic_sample, tiny_model, two_images


def _image(h, w):
    shapes = [(0, h * 0.35, w * 0.4, h * 0.2, w * 0.18, (220, 60, 60)), (1, h * 0.7, w * 0.65, h * 0.15, w * 0.2, (60, 200, 90))]
    return synthetic_sample(h, w, shapes)["image"]


def test_reference_size_equal_to_the_input_changes_nothing():
    torch.manual_seed(0)
    model = tiny_model().eval()
    image = _image(96, 128)
    with torch.no_grad():
        (plain,) = model([{"image": image}])
        model.reference_size = 128  # width 128 -> x scale 1; height 96 -> y scale 0.75
        (wide,) = model([{"image": image}])
        square = _image(96, 96)
        model.reference_size = 0
        (plain_sq,) = model([{"image": square}])
        model.reference_size = 96
        (ref_sq,) = model([{"image": square}])
    a, b = plain_sq["instances"], ref_sq["instances"]
    assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.pred_masks, b.pred_masks)
    # a non-square image differs from its reference along the axis that does not match
    assert not torch.equal(plain["instances"].scores, wide["instances"].scores)


def test_position_encodings_follow_pixels_not_image_fractions():
    small = torch.zeros(1, 16, 16, dtype=torch.bool)
    large = torch.zeros(1, 32, 32, dtype=torch.bool)
    # scale = valid size / reference: 16 / 16 and 32 / 16 feature pixels
    pe_small = sine_position_encoding(small, 8, coordinate_scale=torch.tensor([[1.0, 1.0]]))
    pe_large = sine_position_encoding(large, 8, coordinate_scale=torch.tensor([[2.0, 2.0]]))
    torch.testing.assert_close(pe_large[..., :16, :16], pe_small, rtol=0, atol=1e-5)
    assert not torch.allclose(sine_position_encoding(large, 8)[..., :16, :16], pe_small, atol=1e-2)

    # the mask head's relative encoding: the same pixel offset from the centre, same code
    centre_small = torch.tensor([[0.5, 0.5]])  # pixel 8 of 16
    centre_large = torch.tensor([[0.25, 0.25]])  # pixel 8 of 32
    idx = torch.zeros(1, dtype=torch.long)
    rel_small = mask_sine_encoding(small, centre_small, idx, coordinate_scale=torch.tensor([[1.0, 1.0]]))
    rel_large = mask_sine_encoding(large, centre_large, idx, coordinate_scale=torch.tensor([[2.0, 2.0]]))
    torch.testing.assert_close(rel_large[..., :16, :16], rel_small, rtol=0, atol=1e-5)


def test_proposal_sizes_and_centre_deltas_are_in_pixels():
    model = tiny_model()
    transformer = model.transformer
    for side in (64, 128):
        masks = [torch.zeros(1, side // s, side // s, dtype=torch.bool) for s in (8, 16, 32, 64)]
        memory = torch.zeros(1, sum(m.numel() for m in masks), transformer.embed_dim)
        flat = torch.cat([m.flatten(1) for m in masks], 1)
        scale = torch.full((1, 2), side / 64.0)
        _, proposals = transformer.gen_encoder_proposals(memory, masks, flat, scale)
        finite = proposals[0, :, 2].isfinite()
        # level-0 proposal: proposal_size * 64 pixels wide, whatever the image size
        wh_pixels = proposals[0, finite][:, 2:].sigmoid() * side
        expected = transformer.proposal_size * 64
        assert math.isclose(float(wh_pixels[0, 0]), expected, rel_tol=1e-4)
    # a centre delta moves the centre by the same number of pixels on a 2x larger image
    ref = torch.zeros(1, 1, 4)  # centre 0.5, inverse sigmoid 0
    delta = torch.tensor([[[0.1, 0.0, 0.0, 0.0]]])
    moves = []
    for side in (64, 128):
        box = apply_box_delta(ref, delta, torch.tensor([[[side / 64.0, side / 64.0]]])).sigmoid()
        moves.append(float(box[0, 0, 0] - 0.5) * side)
    assert math.isclose(moves[0], moves[1], rel_tol=2e-2)


def test_training_step_with_reference_size():
    torch.manual_seed(0)
    model = tiny_model(reference_size=64).train()
    with EventStorage(0):
        losses = model(two_images())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


def test_unknown_reference_part_is_named():
    with pytest.raises(ValueError, match="shape"):
        tiny_model(reference_size=64, reference_parts=["shape"])
