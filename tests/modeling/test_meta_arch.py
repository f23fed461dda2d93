"""The SOIT meta-architecture end to end: config, training step, inference, padding."""
import math
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import FrozenBatchNorm2d
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

from conftest import REPO, synthetic_sample, tiny_model, two_images
from soit.modeling import SOIT
from soit.modeling.postprocessing import detections_at_output_size

CONFIGS = os.path.join(REPO, "configs", "models")


# ------------------------------------------------------------------ config (acceptance 1)
def test_r50_config_matches_official_structure():
    cfg = LazyConfig.load(os.path.join(CONFIGS, "soit_r50.py"))
    model = instantiate(cfg.model)
    assert isinstance(model, SOIT)
    num_layers = model.transformer.decoder.num_layers
    assert num_layers == 6 and model.mask_head.num_dynamic_params == 441
    # class and box branches: separate copies per decoder layer + one for the proposals
    for branches in (model.cls_branches, model.reg_branches):
        assert len(branches) == num_layers + 1
        assert len({id(b) for b in branches}) == num_layers + 1
    # one mask branch shared by all decoder layers
    assert isinstance(model.mask_branch.layers[-1], torch.nn.Linear)
    assert model.mask_branch.layers[-1].out_features == 441
    # the official count (42,122,089) includes the backbone's BN affine weights, which are
    # FrozenBN buffers here
    params = sum(p.numel() for p in model.parameters())
    frozen_affine = sum(
        m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, FrozenBatchNorm2d)
    )
    assert params + frozen_affine == 42_122_089
    backbone = sum(p.numel() for p in model.backbone.parameters()) + frozen_affine
    assert backbone == 23_508_032


def test_invalid_mask_head_settings_fail_at_construction():
    with pytest.raises(ValueError, match="divisible"):
        tiny_model(**{"mask_head.mask_channels": 6, "mask_head.num_heads": 4})


def test_without_box_refinement_branches_are_shared():
    model = tiny_model(with_box_refine=False)
    n = model.transformer.decoder.num_layers
    assert len({id(b) for b in model.cls_branches[:n]}) == 1
    assert model.cls_branches[n] is not model.cls_branches[0]


# ------------------------------------------------------------ training (acceptance 7)
def test_training_step_losses_and_gradients():
    torch.manual_seed(0)
    model = tiny_model()
    model.train()
    batch = two_images()
    batch.append(synthetic_sample(64, 80, []))  # an image without any annotation
    with EventStorage(0):
        losses = model(batch)
    n = model.transformer.decoder.num_layers
    expected = set()
    for name in ("loss_cls", "loss_bbox", "loss_giou", "loss_mask_dice", "loss_mask_bce"):
        expected |= {name} | {f"{name}_{i}" for i in range(n - 1)}
    expected |= {"loss_cls_enc", "loss_bbox_enc", "loss_giou_enc"}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for prefix in ("backbone", "neck", "transformer", "mask_encoder", "cls_branches", "reg_branches", "mask_branch"):
        grads = [p.grad for name, p in model.named_parameters() if name.startswith(prefix)]
        assert grads and all(g is not None for g in grads), prefix
        assert any(g.abs().sum() > 0 for g in grads), prefix


def test_frozen_backbone_gets_no_gradient():
    model = tiny_model(**{"backbone.freeze_at": 2})
    model.train()
    with EventStorage(0):
        sum(model(two_images()).values()).backward()
    stem = [p for n, p in model.named_parameters() if n.startswith("backbone.stem")]
    assert all(not p.requires_grad for p in stem)


# ----------------------------------------------------------- inference (acceptance 9)
def test_inference_output_in_original_size():
    torch.manual_seed(0)
    model = tiny_model(num_classes=5).eval()
    batch = two_images()
    batch[0]["height"], batch[0]["width"] = 150, 140  # the original image was larger
    with torch.no_grad():
        outputs = model(batch)
    for x, out in zip(batch, outputs):
        inst = out["instances"]
        assert isinstance(inst, Instances)
        assert inst.image_size == (x["height"], x["width"])
        assert inst.pred_masks.dtype == torch.bool
        assert inst.pred_masks.shape[1:] == (x["height"], x["width"])
        assert len(inst) == min(100, 30 * 5)
        assert torch.all(inst.scores[:-1] >= inst.scores[1:])
        boxes = inst.pred_boxes.tensor
        assert (boxes[:, 0::2] <= x["width"]).all() and (boxes[:, 1::2] <= x["height"]).all() and (boxes >= 0).all()
        assert inst.pred_classes.max() < 5


def test_at_most_max_detections():
    model = tiny_model(num_classes=80).eval()
    with torch.no_grad():
        (out,) = model(two_images()[:1])
    assert len(out["instances"]) == 100


# ------------------------------------------------------------- padding (acceptance 6)
def _one_result(k, hm, wm, fill=None, pad=(0, 0)):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(k, hm, wm, generator=g) * 4
    if pad != (0, 0):
        padded = torch.full((k, hm + pad[0], wm + pad[1]), float(fill))
        padded[:, :hm, :wm] = logits
        logits = padded
    return {
        "scores": torch.rand(k, generator=g).sort(descending=True).values,
        "labels": torch.randint(0, 3, (k,), generator=g),
        "queries": torch.arange(k),
        "boxes": torch.rand(k, 4, generator=g) * 0.5 + 0.2,
        "mask_logits": logits,
    }


@pytest.mark.parametrize("k", [5, 37])
def test_postprocess_in_chunks_equals_all_at_once(k):
    h, w = 75, 90
    result = _one_result(k, math.ceil(h / 8), math.ceil(w / 8))
    for output_size in ((h, w), (150, 180)):
        whole = detections_at_output_size(result, (h, w), output_size, chunk=1000)
        chunked = detections_at_output_size(result, (h, w), output_size, chunk=8)
        assert len(chunked) == k and chunked.image_size == whole.image_size == output_size
        for name in ("pred_masks", "scores", "pred_classes"):
            assert torch.equal(chunked.get(name), whole.get(name)), name
        assert torch.equal(chunked.pred_boxes.tensor, whole.pred_boxes.tensor)


@pytest.mark.parametrize("fill", [50.0, -50.0])
def test_postprocess_ignores_batch_padding(fill):
    h, w = 75, 90  # network input size of this image; its mask map is ceil(h/8) x ceil(w/8)
    hm, wm = math.ceil(h / 8), math.ceil(w / 8)
    alone = detections_at_output_size(_one_result(6, hm, wm), (h, w), (150, 180))
    padded = detections_at_output_size(_one_result(6, hm, wm, fill, pad=(4, 7)), (h, w), (150, 180))
    assert torch.equal(alone.pred_masks, padded.pred_masks)
    assert torch.equal(alone.pred_boxes.tensor, padded.pred_boxes.tensor)
    assert alone.pred_masks.any() and not alone.pred_masks.all()

    official = detections_at_output_size(  # resizes the padded map: stretches the masks
        _one_result(6, hm, wm, fill, pad=(4, 7)), (h, w), (150, 180), inference_padding="official"
    )
    official_alone = detections_at_output_size(_one_result(6, hm, wm), (h, w), (150, 180), inference_padding="official")
    assert torch.equal(official_alone.pred_masks, alone.pred_masks)  # no padding: the same
    assert (official.pred_masks != alone.pred_masks).float().mean() > 0.05


def test_unknown_inference_padding_is_rejected():
    with pytest.raises(ValueError, match="inference_padding"):
        tiny_model(inference_padding="stretch")


# --------------------------------------------------------------- overfit (acceptance 8)
def mask_iou(a, b):
    return ((a & b).sum() / (a | b).sum().clamp(min=1)).item()


def test_overfits_two_synthetic_images():
    """A few hundred steps on two images with exact masks: a model whose learning is broken
    (losses, matching, mask head, gradients) cannot reach IoU 0.8 on every object."""
    torch.manual_seed(0)
    model = tiny_model(num_classes=2, **{"transformer.dropout": 0.0, "mask_encoder.dropout": 0.0})
    batch = two_images()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()
    with EventStorage(0):
        for _ in range(150):
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
    model.eval()
    with torch.no_grad():
        outputs = model(batch)
    for x, out in zip(batch, outputs):
        inst, gt = out["instances"], x["instances"]
        for j in range(len(gt)):
            # the highest-scoring detection of the object's class must be that object
            top = (inst.pred_classes == gt.gt_classes[j]).nonzero()[0, 0]
            assert mask_iou(inst.pred_masks[top], gt.gt_masks.tensor[j]) > 0.8


@pytest.mark.parametrize("two_stage,refine", [(False, True), (False, False), (True, False)])
def test_detector_variants_train_and_infer(two_stage, refine):
    """The paper's detector switches: two-stage and box refinement on or off."""
    torch.manual_seed(0)
    model = tiny_model(two_stage=two_stage, with_box_refine=refine)
    model.train()
    with EventStorage(0):
        losses = model(two_images())
    assert ("loss_cls_enc" in losses) == two_stage
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(two_images())
    assert len(out[0]["instances"]) == 90
