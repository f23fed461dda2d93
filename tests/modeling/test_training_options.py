"""Training options beyond the paper: exact expectations for each, the paper setting untouched."""
import math

import pytest
import torch
from conftest import C, LAYERS, LEVEL_SIZES, Q, has_gradient_path, head_boxes, make_batch, make_branches, make_inputs

from soit.modeling.criterion import SetCriterion
from soit.modeling.losses import ia_bce_loss, sigmoid_focal_loss, varifocal_loss
from soit.modeling.matcher import HungarianMatcher
from soit.modeling.transformer import DeformableTransformer


def sig(x):
    return 1 / (1 + math.exp(-x))


def tiny_transformer(**options):
    torch.manual_seed(0)
    tr = DeformableTransformer(
        embed_dim=C, num_heads=4, num_levels=len(LEVEL_SIZES), num_points=2, num_encoder_layers=1,
        num_decoder_layers=LAYERS, ffn_dim=64, dropout=0.0, num_queries=Q, **options,
    )  # fmt: skip
    return (tr, *make_branches(LAYERS + 1))


# ------------------------------------------------------------------ IoU-aware classification
def one_match():
    """One image, one ground truth, two queries, two classes: query 0 is matched (class 1)
    with IoU 0.6 (pred [0.3, 0.3, 0.7, 0.7] vs gt [0.4, 0.3, 0.8, 0.7]: inter 0.12, union 0.2)."""
    logits = torch.tensor([[[-1.0, 2.0], [0.5, -3.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.1, 0.1, 0.05, 0.05]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.5, 0.4, 0.4]])}]
    matches = [(torch.tensor([0]), torch.tensor([0]))]
    return logits, boxes, targets, matches


def test_varifocal_target_by_hand():
    logits, boxes, targets, matches = one_match()
    crit = SetCriterion(2, HungarianMatcher(), cls_loss="varifocal", mask_loss_layers=0)
    loss_cls = crit.set_losses(logits, boxes, targets, matches, num_gts=1.0)[0]
    q = 0.6
    p = sig(2.0)
    expected = -q * (q * math.log(p) + (1 - q) * math.log(1 - p))
    for x in (-1.0, 0.5, -3.0):  # the other (query, class) pairs: negatives
        expected += -0.75 * sig(x) ** 2 * math.log(1 - sig(x))
    assert loss_cls.item() == pytest.approx(2 * expected, rel=1e-5)


def test_ia_bce_target_by_hand():
    logits, boxes, targets, matches = one_match()
    crit = SetCriterion(2, HungarianMatcher(), cls_loss="ia_bce", mask_loss_layers=0)
    loss_cls = crit.set_losses(logits, boxes, targets, matches, num_gts=1.0)[0]
    s = sig(2.0)
    t = s**0.25 * 0.6**0.75
    expected = -(t * math.log(s) + (1 - t) * math.log(1 - s))
    for x in (-1.0, 0.5, -3.0):
        expected += -(sig(x) ** 2) * math.log(1 - sig(x))
    assert loss_cls.item() == pytest.approx(2 * expected, rel=1e-5)


def test_iou_aware_losses_have_no_gradient_into_the_target():
    logits = torch.randn(3, 4, requires_grad=True)
    quality = torch.rand(3, 4, requires_grad=True)
    positive = torch.rand(3, 4) > 0.5
    for fn in (varifocal_loss, ia_bce_loss):
        fn(logits, quality.detach(), positive).sum().backward()
        assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # a perfectly localised positive learns 1, as with the focal loss (up to the weights)
    one = torch.tensor([3.0])
    assert varifocal_loss(one, torch.ones(1), torch.ones(1, dtype=torch.bool)).item() == pytest.approx(
        -math.log(sig(3.0)), rel=1e-6
    )
    torch.testing.assert_close(
        sigmoid_focal_loss(torch.tensor([-2.0]), torch.zeros(1), alpha=0.25) / 0.75,
        varifocal_loss(torch.tensor([-2.0]), torch.zeros(1), torch.zeros(1, dtype=torch.bool), alpha=1.0),
    )


def test_paper_classification_loss_is_the_default():
    logits, boxes, targets, matches = one_match()
    default = SetCriterion(2, HungarianMatcher(), mask_loss_layers=0).set_losses(logits, boxes, targets, matches, 1.0)
    onehot = torch.zeros_like(logits)
    onehot[0, 0, 1] = 1
    torch.testing.assert_close(default[0], 2 * sigmoid_focal_loss(logits, onehot).sum())
    with pytest.raises(ValueError, match="cls_loss must be one of"):
        SetCriterion(2, HungarianMatcher(), cls_loss="quality_focal")


# ------------------------------------------------------------------ look-forward-twice
def test_look_forward_twice_sends_the_box_loss_into_the_previous_layer():
    feats, masks = make_inputs()
    for lft in (False, True):
        tr, cls, reg = tiny_transformer(look_forward_twice=lft)
        out = tr(feats, masks, cls, reg)
        # layer 1's boxes: does their loss reach layer 0's box branch?
        assert has_gradient_path(head_boxes(out, reg, 1), [reg[0]]) == lft
        # the layers attend around the same (detached) references either way
        torch.testing.assert_close(out["inter_references"][1], head_boxes(out, reg, 0).detach())
    off = tiny_transformer()
    on = tiny_transformer(look_forward_twice=True)
    out_off, out_on = off[0](feats, masks, *off[1:]), on[0](feats, masks, *on[1:])
    for key in ("hs", "inter_references", "enc_outputs_class", "enc_outputs_coord"):
        torch.testing.assert_close(out_off[key], out_on[key])


def test_look_forward_twice_needs_box_refinement():
    with pytest.raises(ValueError, match="look_forward_twice .* needs box_refine=True"):
        tiny_transformer(look_forward_twice=True, box_refine=False)


# ------------------------------------------------------------------ mixed query selection
def test_mixed_query_selection_learns_content_queries():
    feats, masks = make_inputs()
    paper, cls, reg = tiny_transformer()
    tr = tiny_transformer(mixed_query_selection=True)[0]
    assert tr.content_queries.weight.shape == (Q, C) and tr.pos_trans.out_features == C
    assert "content_queries.weight" not in paper.state_dict()
    # the same encoder and proposal branches: the same selected boxes, now only positions
    shared = {k: v for k, v in paper.state_dict().items() if not k.startswith("pos_trans")}
    assert set(tr.state_dict()) - set(shared) == {
        "pos_trans.weight", "pos_trans.bias", "pos_trans_norm.weight", "pos_trans_norm.bias", "content_queries.weight"
    }  # fmt: skip
    tr.load_state_dict(shared, strict=False)
    out = tr(feats, masks, cls, reg)
    torch.testing.assert_close(out["init_reference"], paper(feats, masks, cls, reg)["init_reference"], rtol=0, atol=0)
    assert has_gradient_path(out["hs"][0], [tr.content_queries])
    with pytest.raises(ValueError, match="mixed_query_selection .* needs two_stage=True"):
        tiny_transformer(mixed_query_selection=True, two_stage=False)


# ------------------------------------------------------------------ point-sampled mask losses
def smooth_case():
    """Two masks on an unpadded 6 x 8 stride-8 map (48 x 64 pixels): smooth logits and soft
    targets, so that both the dense and the point losses approximate the same integrals."""
    g = torch.Generator().manual_seed(0)
    coarse = 3 * torch.randn(2, 1, 3, 4, generator=g)
    logits = torch.nn.functional.interpolate(coarse, size=(6, 8), mode="bilinear", align_corners=True)[:, 0]
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 64), indexing="ij")
    targets = torch.stack([torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.05) for cx, cy in ((0.3, 0.4), (0.7, 0.6))])
    return logits, targets, torch.zeros(2, 6, 8, dtype=torch.bool)


def test_point_sampled_mask_losses_approach_the_dense_ones():
    logits, targets, padding = smooth_case()
    dense = SetCriterion(1, HungarianMatcher(), mask_loss_padding="exclude")
    probs = dense.mask_upsample
    from soit.modeling.losses import instance_mask_losses, mask_valid_pixels
    from soit.modeling.mask_head import aligned_bilinear

    size = (probs * 6, probs * 8)
    gt = torch.nn.functional.interpolate(targets[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
    ref = instance_mask_losses(
        aligned_bilinear(logits[:, None], probs)[:, 0].sigmoid(), gt, mask_valid_pixels(padding, size), "exclude"
    )

    def error(points, seed):
        torch.manual_seed(seed)
        crit = SetCriterion(1, HungarianMatcher(), mask_loss_padding="exclude", mask_loss_points=points,
                            mask_loss_importance=0.0)  # fmt: skip
        got = crit._point_losses(logits, targets, padding)
        return max((a - b).abs().max().item() for a, b in zip(got, ref))

    few = sum(error(16, s) for s in range(5)) / 5
    many = sum(error(65536, s) for s in range(5)) / 5
    # what remains is the two discretisations' difference (the dense loss resizes the
    # target with corners aligned and upsamples the logits on a stride-2 grid): about 0.02
    assert many < 0.03 and many < few / 5, (few, many)


def test_point_sampling_prefers_uncertain_points_and_stays_in_the_image():
    logits = torch.full((1, 4, 8), 9.0)
    logits[0, :, 1] = 0.0  # the only uncertain column
    padding = torch.zeros(1, 4, 8, dtype=torch.bool)
    padding[0, :, 4:] = True  # the right half is padding
    from soit.modeling.point_sampling import sample_mask_points

    torch.manual_seed(0)
    points = sample_mask_points(logits, torch.tensor([[0.5, 1.0]]), num_points=40, oversample=3.0, importance=0.75)
    assert points.shape == (1, 40, 2) and (points[..., 0] <= 0.5).all() and (points >= 0).all()
    # the 30 most uncertain of 120 candidates: near column 1 (x in [0.125, 0.25) of the map)
    assert ((points[0, :30, 0] > 0.05) & (points[0, :30, 0] < 0.32)).float().mean() > 0.9
    with pytest.raises(ValueError, match="mask_loss_padding='exclude'"):
        SetCriterion(1, HungarianMatcher(), mask_loss_points=100, mask_loss_padding="official")


# ------------------------------------------------------------------ all options in a SOIT training step
def test_a_training_step_with_every_option():
    from detectron2.utils.events import EventStorage
    from conftest import tiny_model, two_images

    torch.manual_seed(0)
    paper = tiny_model()
    from detectron2.config import LazyCall as L

    from soit.modeling.denoising import DenoisingQueries

    torch.manual_seed(0)
    model = tiny_model(**{
        "denoising": L(DenoisingQueries)(num_classes=3, embed_dim=64, groups=2),
        "transformer.mixed_query_selection": True, "transformer.look_forward_twice": True,
        "transformer.num_queries_one2many": 60, "criterion.cls_loss": "ia_bce", "criterion.mask_loss_points": 64,
        "criterion.mask_loss_padding": "exclude",
    })  # fmt: skip
    assert set(model.state_dict()) - set(paper.state_dict()) == {
        "transformer.content_queries.weight", "denoising.label_embed.weight"
    }  # fmt: skip
    model.train()
    with EventStorage(0):
        losses = model(two_images())
    with EventStorage(0):
        paper.train()
        paper_keys = set(paper(two_images()))
    decoder_keys = {k for k in paper_keys if not k.endswith("_enc")}
    assert set(losses) == paper_keys | {f"{k}_one2many" for k in decoder_keys} | {f"{k}_dn" for k in decoder_keys}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.transformer.content_queries.weight.grad.abs().sum() > 0
    assert model.denoising.label_embed.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="denoising queries need two_stage=True"):
        tiny_model(two_stage=False, denoising=L(DenoisingQueries)(num_classes=3, embed_dim=64))
    # inference is unchanged in form: no training-only outputs
    model.eval()
    with torch.no_grad():
        (out,) = model([two_images()[0]])
    assert out["instances"].pred_masks.shape[-2:] == (96, 96)
    assert model.transformer(*_transformer_inputs(model))["hs"].shape[2] == 30  # eval: one-to-one queries only


def _transformer_inputs(model):
    """What the SOIT head gives the transformer, for one 96 x 96 image."""
    import torch.nn.functional as F

    images, padding = model.preprocess_image([two_images_first()])
    feats = model.neck([model.backbone(images.tensor)[f] for f in model.in_features])
    masks = [F.interpolate(padding[None].float(), size=f.shape[-2:])[0].to(torch.bool) for f in feats]
    return feats, masks, model.cls_branches, model.reg_branches


def two_images_first():
    from conftest import two_images

    return two_images()[0]


# ------------------------------------------------------------------ one-to-many hybrid matching
def test_one2one_queries_do_not_see_the_one2many_group():
    feats, masks = make_inputs()
    paper, cls, reg = tiny_transformer()
    hybrid = tiny_transformer(num_queries_one2many=2 * Q)[0]
    hybrid.load_state_dict(paper.state_dict())  # no new weights
    paper.train(), hybrid.train()
    out_paper, out_hybrid = paper(feats, masks, cls, reg), hybrid(feats, masks, cls, reg)
    assert out_hybrid["hs"].shape[2] == 3 * Q
    torch.testing.assert_close(out_hybrid["hs"][:, :, :Q], out_paper["hs"])
    torch.testing.assert_close(out_hybrid["inter_references"][:, :, :Q], out_paper["inter_references"])
    # the group is trained: its outputs depend on its own queries only, and it is not run in eval mode
    assert (out_hybrid["hs"][:, :, Q:] - out_paper["hs"][:, :, :1]).abs().max() > 0
    hybrid.eval()
    assert hybrid(feats, masks, cls, reg)["hs"].shape[2] == Q
    with pytest.raises(ValueError, match="num_queries_one2many=5: .* needs two_stage=True"):
        tiny_transformer(num_queries_one2many=5, two_stage=False)


def test_one2many_losses_are_one2one_losses_against_the_repeated_ground_truth():
    from soit.modeling.mask_head import InstanceAwareMaskHead
    from soit.modeling.set_losses import SetLosses

    q, q2, k = 6, 9, 3
    outputs, targets, mask_inputs = make_batch([2, 0, 3], Q=q + q2)
    crit = SetCriterion(4, HungarianMatcher(), one2many_repeats=k, one2many_weight=0.5, mask_loss_padding="exclude")
    set_losses = SetLosses(crit, InstanceAwareMaskHead(), num_queries=q)
    losses = set_losses(outputs, mask_inputs, targets)

    one2one = {key: (v[:, :, :q] if key in ("pred_logits", "pred_boxes", "dyn_params") else v) for key, v in outputs.items()}
    alone = set_losses.set_losses(one2one, mask_inputs, targets)
    one2many = {key: outputs[key][:, :, q:] for key in ("pred_logits", "pred_boxes", "dyn_params")}
    repeated = [
        {"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1), "masks": t["masks"].repeat(k, 1, 1)}
        for t in targets
    ]
    reference = set_losses.set_losses(one2many, mask_inputs, repeated)
    assert set(losses) == set(alone) | {f"{key}_one2many" for key in reference}
    for key, value in alone.items():
        torch.testing.assert_close(losses[key], value)
    for key, value in reference.items():
        torch.testing.assert_close(losses[f"{key}_one2many"], 0.5 * value)
    # every repeated copy found a query: 5 ground truths x 3 copies among 9 queries per image
    assert reference["loss_mask_dice"] > 0


# ------------------------------------------------------------------ denoising queries with masks
def test_query_group_mask_by_hand():
    from soit.modeling.transformer import query_group_mask

    # 4 denoising queries in 2 groups, 2 one-to-one, 2 one-to-many
    blocked = query_group_mask(8, num_dn=4, dn_groups=2, num_one2one=2)
    allowed = [
        "11001100",  # dn group 0: itself and the one-to-one queries
        "11001100",
        "00111100",  # dn group 1
        "00111100",
        "00001100",  # one-to-one: themselves only
        "00001100",
        "00000011",  # one-to-many: themselves only
        "00000011",
    ]
    assert (~blocked).int().tolist() == [[int(c) for c in row] for row in allowed]


def test_matching_queries_do_not_see_the_denoising_queries():
    from soit.modeling.denoising import DenoisingQueries

    feats, masks = make_inputs()
    tr, cls, reg = tiny_transformer()
    tr.train()
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]])},
    ]
    torch.manual_seed(1)
    dn = DenoisingQueries(num_classes=5, embed_dim=C, groups=3)(targets)
    assert dn["query"].shape == (2, 3 * 2 * 2, C) and dn["groups"] == 3
    plain = tr(feats, masks, cls, reg)
    with_dn = tr(feats, masks, cls, reg, denoising=dn)
    d = dn["query"].shape[1]
    assert with_dn["hs"].shape[2] == d + Q
    torch.testing.assert_close(with_dn["hs"][:, :, d:], plain["hs"])
    torch.testing.assert_close(with_dn["inter_references"][:, :, d:], plain["inter_references"])
    torch.testing.assert_close(with_dn["init_reference"][:, :d], dn["reference"])


def test_denoising_noise_and_matches():
    from soit.modeling.box_ops import box_cxcywh_to_xyxy
    from soit.modeling.denoising import DenoisingQueries

    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.4, 0.6, 0.1, 0.1]])
    targets = [{"labels": torch.tensor([0, 1]), "boxes": boxes}, {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    torch.manual_seed(0)
    gen = DenoisingQueries(num_classes=2, embed_dim=8, groups=4, box_noise=0.5, label_noise=0.0)
    dn = gen(targets)
    per_group = 4  # 2 positives + 2 negatives (the largest image has 2 ground truths)
    half = boxes[:, 2:].repeat(1, 2) / 2
    for g in range(4):
        pos = box_cxcywh_to_xyxy(dn["reference"][0, g * per_group : g * per_group + 2])
        neg = box_cxcywh_to_xyxy(dn["reference"][0, g * per_group + 2 : g * per_group + 4])
        moved_pos = (pos - box_cxcywh_to_xyxy(boxes)).abs() / half
        moved_neg = (neg - box_cxcywh_to_xyxy(boxes)).abs() / half
        assert (moved_pos <= 0.5 + 1e-5).all() and (moved_neg >= 0.5 - 1e-5).all() and (moved_neg <= 1 + 1e-5).all()
    src, tgt = dn["matches"][0]
    assert src.tolist() == [0, 1, 4, 5, 8, 9, 12, 13] and tgt.tolist() == [0, 1] * 4
    assert dn["matches"][1][0].numel() == 0
    assert gen([{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]) is None
    # labels: every one flipped to a random class at probability 1, none at 0
    flips = DenoisingQueries(num_classes=50, embed_dim=8, groups=20, label_noise=1.0)._noised_labels(torch.zeros(500, dtype=torch.long))
    assert (flips != 0).float().mean() > 0.9


def test_denoising_mask_losses_train_the_positives_toward_their_own_ground_truth():
    from soit.modeling.denoising import DenoisingQueries
    from soit.modeling.mask_head import InstanceAwareMaskHead
    from soit.modeling.set_losses import SetLosses

    q = 6
    torch.manual_seed(0)
    gen = DenoisingQueries(num_classes=4, embed_dim=8, groups=2, loss_weight=0.5)
    _, targets, _ = make_batch([2, 3], Q=q)
    dn = gen(targets)
    d = dn["query"].shape[1]  # 2 groups x (3 positives + 3 negatives)
    outputs, targets, mask_inputs = make_batch([2, 3], Q=d + q)
    crit = SetCriterion(4, HungarianMatcher(), mask_loss_padding="exclude")
    set_losses = SetLosses(crit, InstanceAwareMaskHead(), num_queries=q, denoising_weight=gen.loss_weight)
    losses = set_losses.denoising_losses(outputs, mask_inputs, targets, dn)
    assert {"loss_mask_dice_dn", "loss_cls_dn", "loss_bbox_0_dn"} <= set(losses)
    losses["loss_mask_dice_dn"].backward()
    touched = outputs["dyn_params"].grad[-1].abs().sum(-1) > 0  # (B, Q) of the last layer
    positives = torch.zeros_like(touched)
    for b, (src, _) in enumerate(dn["matches"]):
        positives[b, src] = True
    assert touched.equal(positives)  # the positives' generated parameters, and nothing else
    # each positive's mask target is its own ground truth: a query's loss changes with it alone
    changed = [dict(t) for t in targets]
    changed[1]["masks"] = changed[1]["masks"].clone()
    changed[1]["masks"][2] = 1 - changed[1]["masks"][2]
    again = set_losses.denoising_losses(outputs, mask_inputs, changed, dn)
    assert not torch.allclose(again["loss_mask_dice_dn"], losses["loss_mask_dice_dn"])
    torch.testing.assert_close(again["loss_cls_dn"], losses["loss_cls_dn"])
