"""SetCriterion: loss keys, empty images, mask-loss layers and padding, hand-computed values."""

import math

import pytest
import torch
from torch import nn

from conftest import make_batch
from soit.modeling.criterion import SetCriterion, matched_queries
from soit.modeling.losses import dice_loss, instance_mask_losses, mask_valid_pixels, sigmoid_focal_loss
from soit.modeling.mask_head import InstanceAwareMaskHead
from soit.modeling.matcher import HungarianMatcher
from soit.modeling.set_losses import SetLosses

SET_KEYS = ("loss_cls", "loss_bbox", "loss_giou")
MASK_KEYS = ("loss_mask_dice", "loss_mask_bce")


def criterion(**kwargs):
    return SetCriterion(4, HungarianMatcher(), **kwargs)


def run_losses(crit, outputs, targets, mask_inputs, head=None):
    """What training runs: match, the mask head on the matched queries, the losses."""
    num_queries = outputs["pred_logits"].shape[2]  # no other query group
    return SetLosses(crit, head or InstanceAwareMaskHead(), num_queries)(outputs, mask_inputs, targets)


def expected_keys(Ld, mask_layers, enc=True):
    keys = set()
    for layer in range(Ld):
        s = "" if layer == Ld - 1 else f"_{layer}"
        keys |= {k + s for k in SET_KEYS}
        if layer >= Ld - mask_layers:
            keys |= {k + s for k in MASK_KEYS}
    if enc:
        keys |= {k + "_enc" for k in SET_KEYS}
    return keys


# ---------------------------------------------------------------- loss functions by hand
def test_focal_loss_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.5])
    targets = torch.tensor([1.0, 0.0, 0.0])
    out = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    s = [1 / (1 + math.exp(-x)) for x in (2.0, -1.0, 0.5)]
    expected = [
        -0.25 * (1 - s[0]) ** 2 * math.log(s[0]),
        -0.75 * s[1] ** 2 * math.log(1 - s[1]),
        -0.75 * s[2] ** 2 * math.log(1 - s[2]),
    ]
    torch.testing.assert_close(out, torch.tensor(expected))


def test_dice_by_hand():
    p = torch.tensor([[0.5, 1.0, 0.0, 0.25]])
    t = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # 1 - 2 * 1.5 / (0.25 + 1 + 0.0625 + 2 + 1e-5)
    torch.testing.assert_close(dice_loss(p, t), torch.tensor([1 - 3.0 / (3.3125 + 1e-5)]))


def test_valid_pixels():
    pad = torch.zeros(1, 2, 3, dtype=torch.bool)
    pad[:, :, 2] = True
    valid = mask_valid_pixels(pad, (8, 12))
    # align_corners=True: output column X reads stride-8 column X * 2 / 11, valid while <= 1
    assert valid[0].all(0).tolist() == [True] * 6 + [False] * 6 and valid.all(1).equal(valid[:, 0])
    assert mask_valid_pixels(torch.zeros(1, 2, 3, dtype=torch.bool), (8, 12)).all()


class ConstantMaskHead(nn.Module):
    """Stub: every pixel's logit is the instance's first dynamic parameter."""

    num_dynamic_params = 3

    def forward(self, mask_feats, mask_padding, dyn_params, centers, batch_index, coordinate_scale=None):
        h, w = mask_feats.shape[-2:]
        return dyn_params[:, :1, None].expand(-1, h, w)


@pytest.mark.parametrize("padding_mode", ["official", "exclude"])
@pytest.mark.parametrize("padded", [False, True])
def test_hand_made_case(padding_mode, padded):
    """One image, one ground truth, two queries; constant mask probability p.

    The stride-8 map is 2 x 3 (loss map 8 x 12); with ``padded`` its last column is padding,
    which leaves loss-map columns 0-5 valid (48 pixels). The target covers image columns
    0-11 of 24, i.e. exactly loss-map columns 0-5 after the align_corners resize."""
    logits = torch.tensor([[[[-1.0, 2.0], [0.5, -3.0]]]])
    boxes = torch.tensor([[[[0.5, 0.5, 0.4, 0.4], [0.1, 0.1, 0.05, 0.05]]]])
    L = 0.3
    dyn = torch.tensor([[[[L, 0.0, 0.0], [-5.0, 0.0, 0.0]]]])
    masks = torch.zeros(1, 16, 24)
    masks[:, :, :12] = 1.0
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.5, 0.4, 0.4]]), "masks": masks}]
    pad = torch.zeros(1, 2, 3, dtype=torch.bool)
    pad[:, :, 2] = padded
    crit = SetCriterion(2, HungarianMatcher(), mask_loss_padding=padding_mode)
    out = {"pred_logits": logits, "pred_boxes": boxes, "dyn_params": dyn}
    losses = run_losses(crit, out, targets, {"mask_feats": torch.zeros(1, 8, 2, 3), "mask_padding": pad}, ConstantMaskHead())

    def sig(x):
        return 1 / (1 + math.exp(-x))

    focal = -0.25 * (1 - sig(2.0)) ** 2 * math.log(sig(2.0))
    for x in (-1.0, 0.5, -3.0):
        focal += -0.75 * sig(x) ** 2 * math.log(1 - sig(x))
    assert losses["loss_cls"].item() == pytest.approx(2 * focal, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(5 * 0.1, rel=1e-5)
    # pred [0.3, 0.3, 0.7, 0.7] vs gt [0.4, 0.3, 0.8, 0.7]: GIoU 0.6
    assert losses["loss_giou"].item() == pytest.approx(2 * (1 - 0.6), rel=1e-5)

    p = sig(L)
    ones, zeros = 48, 48  # target 1 / 0 pixels of the 8 x 12 loss map
    counted_zeros = 0 if (padded and padding_mode == "exclude") else zeros
    num_valid = 48 if padded else 96
    dice = 1 - 2 * ones * p / ((ones + counted_zeros) * p * p + ones + 1e-5)
    bce = (ones * -math.log(p) + counted_zeros * -math.log(1 - p)) / num_valid
    assert losses["loss_mask_dice"].item() == pytest.approx(8 * dice, rel=1e-5)
    assert losses["loss_mask_bce"].item() == pytest.approx(2 * bce, rel=1e-5)


# ---------------------------------------------------------------- keys, layers, empty images
def test_all_keys_and_backward():
    outputs, targets, mask_inputs = make_batch([2, 3])
    losses = run_losses(criterion(), outputs, targets, mask_inputs)
    assert set(losses) == expected_keys(3, 3)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    for t in list(outputs.values()) + [mask_inputs["mask_feats"]]:
        assert t.grad is not None and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("k", [0, 1, 2])
def test_mask_loss_layers(k):
    outputs, targets, mask_inputs = make_batch([2, 1])
    losses = run_losses(criterion(mask_loss_layers=k), outputs, targets, mask_inputs)
    assert set(losses) == expected_keys(3, k)
    full = run_losses(criterion(), outputs, targets, mask_inputs)
    for key in losses:
        torch.testing.assert_close(losses[key], full[key])
    with pytest.raises(ValueError, match="mask_loss_layers"):
        run_losses(criterion(mask_loss_layers=4), outputs, targets, mask_inputs)


def test_one_mask_head_call_for_all_layers_and_images():
    calls = []
    head = InstanceAwareMaskHead()
    head.register_forward_hook(lambda mod, args, out: calls.append(out.shape[0]))
    outputs, targets, mask_inputs = make_batch([2, 0, 3], Ld=4)
    run_losses(SetCriterion(4, HungarianMatcher()), outputs, targets, mask_inputs, head)
    assert calls == [4 * 5]


def test_each_layer_uses_its_own_box_centre():
    # one query per image and one ground truth: the matching cannot change with the boxes
    outputs, targets, mask_inputs = make_batch([1], Ld=2, Q=1)
    before = run_losses(criterion(), outputs, targets, mask_inputs)
    with torch.no_grad():
        outputs["pred_boxes"][0, :, :, :2] += 0.1
    after = run_losses(criterion(), outputs, targets, mask_inputs)
    for key in MASK_KEYS:
        assert not torch.allclose(before[key + "_0"], after[key + "_0"])
        torch.testing.assert_close(before[key], after[key])


def test_image_without_annotations():
    outputs, targets, mask_inputs = make_batch([0, 2], enc=True)
    crit = criterion()
    losses = run_losses(crit, outputs, targets, mask_inputs)
    assert set(losses) == expected_keys(3, 3)
    assert all(torch.isfinite(v) for v in losses.values())
    # the empty image adds only its (all-negative) classification terms
    single = {k: (v[:, 1:] if k.startswith("pred") or k == "dyn_params" else v[1:]) for k, v in outputs.items()}
    single_inputs = {k: v[1:] for k, v in mask_inputs.items()}
    alone = run_losses(crit, single, targets[1:], single_inputs)
    for key, value in losses.items():
        if key.startswith("loss_cls"):
            logits = outputs["enc_logits"][0] if key.endswith("_enc") else None
            if logits is None:
                layer = 2 if key == "loss_cls" else int(key.split("_")[-1])
                logits = outputs["pred_logits"][layer, 0]
            extra = 2 * sigmoid_focal_loss(logits, torch.zeros_like(logits)).sum() / 2
            torch.testing.assert_close(value, alone[key] + extra)
        else:
            torch.testing.assert_close(value, alone[key])


def test_batch_without_any_annotation():
    outputs, targets, mask_inputs = make_batch([0, 0])
    losses = run_losses(criterion(), outputs, targets, mask_inputs)
    assert all(torch.isfinite(v) for v in losses.values())
    for key, value in losses.items():
        if not key.startswith("loss_cls"):
            assert value.item() == 0.0
    sum(losses.values()).backward()
    # zero gradients still reach the mask branch and F_mask
    assert outputs["dyn_params"].grad is not None and mask_inputs["mask_feats"].grad is not None


def test_encoder_proposals_use_binary_labels():
    outputs, targets, mask_inputs = make_batch([2, 1], K=3)
    losses = run_losses(criterion(), outputs, targets, mask_inputs)
    binary = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
    as_decoder = {"pred_logits": outputs["enc_logits"][None], "pred_boxes": outputs["enc_boxes"][None]}
    ref = SetCriterion(3, HungarianMatcher(), mask_loss_layers=0)(as_decoder, binary)
    for key in SET_KEYS:
        torch.testing.assert_close(losses[key + "_enc"], ref[key])


def test_bad_options():
    with pytest.raises(ValueError, match="mask_loss_padding"):
        criterion(mask_loss_padding="crop")
    outputs, targets, mask_inputs = make_batch([1])
    with pytest.raises(ValueError, match="mask_logits"):
        criterion()(outputs, targets)
    crit = criterion()
    matches = crit.match(outputs, targets)
    wrong = dict(outputs, mask_logits=torch.zeros(2, 4, 5), mask_padding=mask_inputs["mask_padding"])
    with pytest.raises(ValueError, match="2 mask logits for 3 matched queries"):
        crit(wrong, targets, matches)


def test_the_criterion_needs_no_mask_head():
    """Mask logits given directly: the losses are those of the same logits through SetLosses."""
    outputs, targets, mask_inputs = make_batch([2, 1])
    crit = criterion(mask_loss_layers=2)
    matches = crit.match(outputs, targets)
    index = matched_queries(matches["layers"], crit.mask_layers(3))
    assert index["layer"].tolist() == [1] * 3 + [2] * 3 and index["image"].tolist() == [0, 0, 1] * 2
    head = InstanceAwareMaskHead()
    at = (index["layer"], index["image"], index["query"])
    logits = head(mask_inputs["mask_feats"], mask_inputs["mask_padding"], outputs["dyn_params"][at],
                  outputs["pred_boxes"][at][:, :2], index["image"])  # fmt: skip
    given = dict(outputs, mask_logits=logits, mask_padding=mask_inputs["mask_padding"])
    direct = crit(given, targets, matches)
    through_model = run_losses(crit, outputs, targets, mask_inputs, head)
    assert direct.keys() == through_model.keys()
    for key in direct:
        torch.testing.assert_close(direct[key], through_model[key])


# ---------------------------------------------------------------- padding in the mask losses
def test_exclude_ignores_padding_official_does_not():
    """Same probabilities in the valid region; padding filled with arbitrary values."""
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 5, 7, generator=gen)
    tgt = (torch.rand(2, 5, 7, generator=gen) > 0.5).float() * 0.9
    crop = instance_mask_losses(probs, tgt, torch.ones(2, 5, 7, dtype=torch.bool), "exclude")

    def padded(fill):
        p = fill.clone()
        p[:, :5, :7] = probs
        t = torch.zeros(2, 8, 10)
        t[:, :5, :7] = tgt
        valid = torch.zeros(2, 8, 10, dtype=torch.bool)
        valid[:, :5, :7] = True
        return p, t, valid

    a = padded(torch.rand(2, 8, 10, generator=gen))
    b = padded(torch.rand(2, 8, 10, generator=gen))
    for got in (instance_mask_losses(*a, "exclude"), instance_mask_losses(*b, "exclude")):
        for x, y in zip(got, crop):
            torch.testing.assert_close(x, y)
    for x, y in zip(instance_mask_losses(*a, "official"), instance_mask_losses(*b, "official")):
        assert (x - y).abs().min() > 1e-4


def test_criterion_padding_modes_with_the_real_head():
    """Arbitrary F_mask values in the padded cells change the padded logits only: the
    "exclude" losses stay put, the "official" ones move."""
    outputs, targets, mask_inputs = make_batch([2, 3], valid=[(4, 5), (3, 3)])
    changed = dict(mask_inputs)
    feats = mask_inputs["mask_feats"].detach().clone()
    feats[1, :, 3:, :] = 10 * torch.randn(8, 1, 5)
    feats[1, :, :, 3:] = -7.0
    changed["mask_feats"] = feats
    for mode, same in (("exclude", True), ("official", False)):
        crit = criterion(mask_loss_padding=mode)
        l1, l2 = run_losses(crit, outputs, targets, mask_inputs), run_losses(crit, outputs, targets, changed)
        for key in l1:
            if key.startswith("loss_mask"):
                assert torch.allclose(l1[key], l2[key], rtol=1e-6, atol=1e-7) == same, (mode, key)
            else:
                torch.testing.assert_close(l1[key], l2[key])
