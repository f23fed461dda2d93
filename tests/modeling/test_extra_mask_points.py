"""Masks of the training-only query groups (one-to-many, denoising) evaluated at points only,
and their mask losses on fewer decoder layers: what keeps hybrid matching plus denoising
within the paper recipe's memory (SetCriterion ``extra_mask_loss_points`` /
``extra_mask_loss_layers``)."""

import pytest
import torch

from conftest import make_batch
from soit.modeling.criterion import SetCriterion
from soit.modeling.denoising import DenoisingQueries
from soit.modeling.mask_head import InstanceAwareMaskHead
from soit.modeling.matcher import HungarianMatcher
from soit.modeling.set_losses import SetLosses


def _head_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, h, w = 2, 7, 9
    feats = torch.randn(B, 8, h, w, generator=g)
    padding = torch.zeros(B, h, w, dtype=torch.bool)
    padding[1, 5:] = True
    padding[1, :, 6:] = True
    n = 5
    head = InstanceAwareMaskHead()
    dyn = 0.3 * torch.randn(n, head.num_dynamic_params, generator=g)
    centers = torch.rand(n, 2, generator=g)
    batch_index = torch.tensor([0, 1, 1, 0, 1])
    return feats, padding, dyn, centers, batch_index


@pytest.mark.parametrize("pos_encoding", ["relative", "absolute", "none"])
@pytest.mark.parametrize("scaled", [False, True])
def test_head_at_pixel_centres_equals_the_full_map(pos_encoding, scaled):
    feats, padding, dyn, centers, batch_index = _head_inputs()
    head = InstanceAwareMaskHead(pos_encoding=pos_encoding)
    scale = torch.tensor([[1.5, 0.5], [2.0, 3.0]]) if scaled else None
    dense = head(feats, padding, dyn, centers, batch_index, scale)
    h, w = padding.shape[-2:]
    g = torch.Generator().manual_seed(1)
    # 20 valid pixels of each instance's image, as (x, y) fractions of the padded map
    rows, cols = [], []
    for b in batch_index.tolist():
        ys, xs = (~padding[b]).nonzero(as_tuple=True)
        pick = torch.randint(0, len(ys), (20,), generator=g)
        rows.append(ys[pick])
        cols.append(xs[pick])
    rows, cols = torch.stack(rows), torch.stack(cols)
    points = torch.stack([(cols + 0.5) / w, (rows + 0.5) / h], -1)
    at_points = head.forward_at_points(feats, padding, dyn, centers, batch_index, points, scale)
    expected = dense[torch.arange(len(dyn))[:, None], rows, cols]
    torch.testing.assert_close(at_points, expected, rtol=1e-5, atol=1e-5)


def test_head_at_points_gradients_reach_features_and_parameters():
    feats, padding, dyn, centers, batch_index = _head_inputs()
    feats.requires_grad_()
    dyn.requires_grad_()
    points = torch.rand(len(dyn), 11, 2) * 0.6
    logits = InstanceAwareMaskHead().forward_at_points(feats, padding, dyn, centers, batch_index, points)
    assert logits.shape == (5, 11)
    logits.sum().backward()
    assert feats.grad.abs().sum() > 0 and (dyn.grad.abs().sum(1) > 0).all()
    empty = InstanceAwareMaskHead().forward_at_points(feats, padding, dyn[:0], centers[:0], batch_index[:0], points[:0])
    assert empty.shape == (0, 11)


def _denoising_losses(crit, q=6, seed=0):
    torch.manual_seed(seed)
    gen = DenoisingQueries(num_classes=4, embed_dim=8, groups=2)
    _, targets, _ = make_batch([2, 3], Q=q)
    dn = gen(targets)
    outputs, targets, mask_inputs = make_batch([2, 3], Q=dn["query"].shape[1] + q, valid=[(4, 5), (3, 4)])
    set_losses = SetLosses(crit, InstanceAwareMaskHead(), num_queries=q, denoising_weight=gen.loss_weight)
    return set_losses, outputs, targets, mask_inputs, dn


def test_denoising_masks_at_points_are_the_dense_masks_read_at_those_points():
    crit = SetCriterion(4, HungarianMatcher(), mask_loss_padding="exclude", extra_mask_loss_points=12)
    losses_of, outputs, targets, mask_inputs, dn = _denoising_losses(crit)
    seen = {}
    choose = losses_of.extra_mask_points

    def recording(outputs, mask_inputs, index):
        seen["index"], seen["points"] = index, choose(outputs, mask_inputs, index)
        return seen["points"]

    losses_of.extra_mask_points = recording
    losses = losses_of.denoising_losses(outputs, mask_inputs, targets, dn)
    index, points = seen["index"], seen["points"]
    assert points.shape == (index["query"].numel(), 12, 2)
    # every point lies in its mask's image: (x, y) < the valid fraction of the padded map
    extent = torch.tensor([[5 / 5, 4 / 4], [4 / 5, 3 / 4]])[index["image"]]
    assert (points >= 0).all() and (points <= extent[:, None]).all()
    # the same losses from the full-map logits read at the same points
    dense = losses_of.matched_mask_logits(outputs, mask_inputs, index)
    from soit.modeling.point_sampling import point_sample

    crit_dense = SetCriterion(4, HungarianMatcher(), mask_loss_padding="exclude")
    read = point_sample(dense, points)
    expected = crit_dense(
        dict(outputs, **{k: outputs[k][:, :, : dn["query"].shape[1]] for k in ("pred_logits", "pred_boxes")},
             mask_logits=read, mask_points=points, mask_padding=mask_inputs["mask_padding"]),
        targets, {"layers": [dn["matches"]] * 3, "enc": None}, crit.num_gts(targets, "cpu") * dn["groups"],
    )  # fmt: skip
    # bilinear reads of the logits differ from the head evaluated between pixel centres;
    # at the centres they agree (test above), so the losses are close, not equal
    for key in ("loss_mask_dice", "loss_mask_bce_0"):
        assert losses[f"{key}_dn"].item() == pytest.approx(expected[key].item(), rel=0.25)
    # the gradient reaches only the positives' generated parameters
    losses["loss_mask_dice_dn"].backward()
    touched = outputs["dyn_params"].grad[-1].abs().sum(-1) > 0
    positives = torch.zeros_like(touched)
    for b, (src, _) in enumerate(dn["matches"]):
        positives[b, src] = True
    assert touched.equal(positives)


def test_uncertain_points_come_from_the_full_map():
    crit = SetCriterion(
        4, HungarianMatcher(), mask_loss_padding="exclude", extra_mask_loss_points=8, mask_loss_importance=1.0,
        mask_loss_oversample=4.0,
    )  # fmt: skip
    losses_of, outputs, _, mask_inputs, dn = _denoising_losses(crit)
    from soit.modeling.criterion import matched_queries
    from soit.modeling.point_sampling import point_sample

    index = matched_queries([dn["matches"]] * 3, [2])
    torch.manual_seed(3)
    points = losses_of.extra_mask_points(outputs, mask_inputs, index)
    dense = losses_of.matched_mask_logits(outputs, mask_inputs, index).detach()
    losses_of.criterion = SetCriterion(
        4, HungarianMatcher(), mask_loss_padding="exclude", extra_mask_loss_points=8, mask_loss_importance=0.0
    )
    torch.manual_seed(3)
    uniform = losses_of.extra_mask_points(outputs, mask_inputs, index)
    # the chosen points are less certain (|logit| closer to 0) than random ones
    assert point_sample(dense, points).abs().mean() < point_sample(dense, uniform).abs().mean()


def test_extra_mask_loss_layers_limit_the_training_only_groups_only():
    crit = SetCriterion(4, HungarianMatcher(), mask_loss_padding="exclude", extra_mask_loss_layers=1)
    losses_of, outputs, targets, mask_inputs, dn = _denoising_losses(crit)
    losses = losses_of.denoising_losses(outputs, mask_inputs, targets, dn)
    assert "loss_mask_dice_dn" in losses and "loss_mask_bce_dn" in losses
    assert not any(k.startswith(("loss_mask_dice_0", "loss_mask_dice_1")) for k in losses)
    assert {"loss_cls_0_dn", "loss_bbox_1_dn"} <= set(losses)  # class and box losses on every layer
    assert crit.mask_layers(3) == [0, 1, 2] and crit.mask_layers(3, extra=True) == [2]


def test_invalid_extra_mask_options_are_named():
    with pytest.raises(ValueError, match="extra_mask_loss_points.*mask_loss_padding='exclude'"):
        SetCriterion(4, HungarianMatcher(), mask_loss_padding="official", extra_mask_loss_points=16)
    with pytest.raises(ValueError, match="extra_mask_loss_points must be >= 0"):
        SetCriterion(4, HungarianMatcher(), extra_mask_loss_points=-1)
    with pytest.raises(ValueError, match="extra_mask_loss_layers must be None"):
        SetCriterion(4, HungarianMatcher(), extra_mask_loss_layers=-1)
    with pytest.raises(ValueError, match="extra_mask_loss_layers=4 but the decoder has only 3"):
        SetCriterion(4, HungarianMatcher(), extra_mask_loss_layers=4).mask_layers(3, extra=True)


def test_a_training_step_with_hybrid_denoising_and_masks_at_points():
    from conftest import tiny_model, two_images
    from detectron2.config import LazyCall as L
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    model = tiny_model(**{
        "denoising": L(DenoisingQueries)(num_classes=3, embed_dim=64, groups=2),
        "transformer.num_queries_one2many": 60, "criterion.mask_loss_padding": "exclude",
        "criterion.extra_mask_loss_points": 32, "criterion.extra_mask_loss_layers": 1,
    })  # fmt: skip
    model.train()
    counted = []
    at_points = model.mask_head.forward_at_points

    def counting(*args, **kwargs):
        out = at_points(*args, **kwargs)
        counted.append(out.shape)
        return out

    model.mask_head.forward_at_points = counting
    with EventStorage(0):
        losses = model(two_images())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    # one call per training-only group (one-to-many, denoising), 32 points per mask
    assert len(counted) == 2 and all(s[1] == 32 for s in counted)
    assert "loss_mask_dice_one2many" in losses and "loss_mask_dice_0_one2many" not in losses
    assert "loss_mask_dice_dn" in losses and "loss_mask_dice_0" in losses  # one-to-one: every layer
