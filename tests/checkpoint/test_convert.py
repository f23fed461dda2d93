"""Conversion of the authors' checkpoints: names, strict accounting, files, and parity of the
converted model with the official implementation's stored outputs and losses."""

import os
import re

import numpy as np
import pytest
import torch
from conftest import REPO, load_tool, shared_file
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import BitMasks, Boxes, Instances
from torch import nn

from soit.checkpoint import (
    AUTHOR,
    ConversionError,
    convert_checkpoint,
    convert_official_state_dict,
    infer_architecture,
    load_official_checkpoint,
    model_config_for,
    official_to_ours,
)
from soit.modeling.postprocessing import detections_at_output_size, select_detections

R50_CONFIG = os.path.join(REPO, "configs", "models", "soit_r50.py")
BN_STATS = ("running_mean", "running_var")


def official_listing(depth=50):
    """name -> shape of the official R-50 checkpoint; R-101 has 23 blocks in layer3."""
    shapes = {}
    with open(shared_file("official_keys_r50.txt")) as f:
        for line in f:
            name, shape = line.rstrip("\n").split("\t")
            shapes[name] = tuple(int(s) for s in re.findall(r"\d+", shape))
    assert len(shapes) == 679
    if depth == 101:
        block = {k[len("backbone.layer3.1.") :]: v for k, v in shapes.items() if k.startswith("backbone.layer3.1.")}
        last = [k for k in shapes if k.startswith("backbone.layer3.5.")][-1]
        r101 = {}
        for name, shape in shapes.items():
            r101[name] = shape
            if name == last:  # blocks 6..22 after the last R-50 block of layer3
                r101.update({f"backbone.layer3.{b}.{s}": v for b in range(6, 23) for s, v in block.items()})
        shapes = r101
    return shapes


def zeros_state_dict(shapes):
    return {
        k: torch.zeros(s, dtype=torch.int64 if k.endswith("num_batches_tracked") else torch.float32)
        for k, s in shapes.items()
    }


def r50_model_config(depth=50):
    cfg = LazyConfig.load(R50_CONFIG).model
    cfg.backbone.stages.depth = depth
    return cfg


@pytest.fixture(scope="module")
def r50_reference():
    """name -> shape of our R-50 model's state dict."""
    model = instantiate(r50_model_config(50))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ names and accounting
def test_name_mapping_examples():
    table = {
        "backbone.conv1.weight": "backbone.stem.conv1.weight",
        "backbone.bn1.running_var": "backbone.stem.conv1.norm.running_var",
        "backbone.layer1.0.conv3.weight": "backbone.res2.0.conv3.weight",
        "backbone.layer2.3.bn2.bias": "backbone.res3.3.conv2.norm.bias",
        "backbone.layer4.0.downsample.0.weight": "backbone.res5.0.shortcut.weight",
        "backbone.layer3.0.downsample.1.running_mean": "backbone.res4.0.shortcut.norm.running_mean",
        "neck.extra_convs.0.gn.bias": "neck.extra_convs.0.gn.bias",
        "bbox_head.transformer.level_embeds": "transformer.level_embeds",
        "bbox_head.transformer.encoder.layers.4.attentions.0.value_proj.weight": "transformer.encoder.layers.4.self_attn.value_proj.weight",
        "bbox_head.transformer.encoder.layers.1.ffns.0.layers.0.0.bias": "transformer.encoder.layers.1.ffn.linear1.bias",
        "bbox_head.transformer.encoder.layers.1.norms.1.weight": "transformer.encoder.layers.1.norm2.weight",
        "bbox_head.transformer.decoder.layers.2.attentions.0.attn.in_proj_weight": "transformer.decoder.layers.2.self_attn.in_proj_weight",
        "bbox_head.transformer.decoder.layers.2.attentions.0.attn.out_proj.bias": "transformer.decoder.layers.2.self_attn.out_proj.bias",
        "bbox_head.transformer.decoder.layers.5.attentions.1.sampling_offsets.bias": "transformer.decoder.layers.5.cross_attn.sampling_offsets.bias",
        "bbox_head.transformer.decoder.layers.0.ffns.0.layers.1.weight": "transformer.decoder.layers.0.ffn.linear2.weight",
        "bbox_head.transformer.decoder.layers.0.norms.2.bias": "transformer.decoder.layers.0.norm3.bias",
        "bbox_head.transformer.pos_trans_norm.weight": "transformer.pos_trans_norm.weight",
        "bbox_head.transformer.seg_encoder.layers.0.attentions.0.attention_weights.weight": "mask_encoder.layers.0.self_attn.attention_weights.weight",
        "bbox_head.transformer.seg_encoder.layers.0.norms.0.bias": "mask_encoder.layers.0.norm1.bias",
        "bbox_head.transformer.mask_trans.weight": "mask_encoder.proj.weight",
        "bbox_head.transformer.mask_trans_norm.bias": "mask_encoder.norm.bias",
        "bbox_head.cls_branches.6.bias": "cls_branches.6.bias",
        "bbox_head.reg_branches.3.2.weight": "reg_branches.3.layers.1.weight",
        "bbox_head.reg_branches.0.4.bias": "reg_branches.0.layers.2.bias",
        "bbox_head.query_embedding.weight": "transformer.query_embedding.weight",
    }
    for official, ours in table.items():
        assert official_to_ours(official) == ours, official
    assert official_to_ours("backbone.layer1.0.bn1.num_batches_tracked") is None
    for bad in (
        "backbone.fc.weight",
        "bbox_head.transformer.decoder.layers.0.attentions.2.value_proj.weight",
        "head.x",
    ):
        with pytest.raises(ConversionError, match=re.escape(bad)):
            official_to_ours(bad)


@pytest.mark.parametrize("depth", [50, 101])
def test_official_listing_converts_and_loads_strictly(depth):
    shapes = official_listing(depth)
    official = zeros_state_dict(shapes)
    arch = infer_architecture(official)
    assert arch["depth"] == depth and arch["blocks"] == ((3, 4, 6, 3) if depth == 50 else (3, 4, 23, 3))
    assert (arch["num_encoder_layers"], arch["num_decoder_layers"], arch["mask_encoder_layers"]) == (6, 6, 1)
    assert (arch["num_classes"], arch["two_stage"], arch["mask_branch_copies"], arch["num_dynamic_params"]) == (
        80,
        True,
        6,
        441,
    )
    model = instantiate(r50_model_config(depth))
    stats = {}
    converted = convert_official_state_dict(official, reference=model.state_dict(), stats=stats)
    num_bn = sum(1 for k in shapes if k.endswith("num_batches_tracked"))
    # every official tensor is used once: 5 of the 6 mask-branch copies merge away, the
    # BatchNorm step counters are dropped
    assert len(converted) == len(shapes) - num_bn - 5 * 6
    assert sorted(stats["dropped"]) == sorted(k for k in shapes if k.endswith("num_batches_tracked"))
    assert stats["mask_branch_copies"] == 6
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # official parameter counts (the shared mask branch once; BN statistics are not parameters)
    params = sum(v.numel() for k, v in converted.items() if not k.endswith(BN_STATS))
    assert params == {50: 42_122_089, 101: 61_114_217}[depth]
    # the architecture the converter infers builds the same model
    if depth == 50:
        rebuilt = instantiate(model_config_for(arch))
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in model.state_dict().items()
        }


def _convert_r50(official, reference):
    return convert_official_state_dict(official, reference=reference)


def test_missing_key_fails_naming_it(r50_reference):
    official = zeros_state_dict(official_listing())
    del official["bbox_head.transformer.decoder.layers.3.norms.1.weight"]
    with pytest.raises(ConversionError, match=re.escape("transformer.decoder.layers.3.norm2.weight")):
        _convert_r50(official, r50_reference)
    official = zeros_state_dict(official_listing())
    del official["backbone.layer3.2.bn2.running_var"]
    with pytest.raises(ConversionError, match=re.escape("backbone.res4.2.conv2.norm.running_var")):
        _convert_r50(official, r50_reference)


def test_extra_key_fails_naming_it(r50_reference):
    official = zeros_state_dict(official_listing())
    official["bbox_head.transformer.decoder.layers.0.attentions.2.value_proj.weight"] = torch.zeros(256, 256)
    with pytest.raises(ConversionError, match=re.escape("decoder.layers.0.attentions.2.value_proj.weight")):
        _convert_r50(official, r50_reference)
    official = zeros_state_dict(official_listing())
    official["bbox_head.cls_branches.7.weight"] = torch.zeros(80, 256)  # a valid name our model lacks
    with pytest.raises(
        ConversionError, match=re.escape("cls_branches.7.weight (from bbox_head.cls_branches.7.weight)")
    ):
        _convert_r50(official, r50_reference)
    # an unknown key fails even without a reference model
    official = zeros_state_dict(official_listing())
    official["backbone.fc.weight"] = torch.zeros(1000, 2048)
    with pytest.raises(ConversionError, match=re.escape("backbone.fc.weight")):
        convert_official_state_dict(official)


def test_wrong_shape_fails_naming_it(r50_reference):
    official = zeros_state_dict(official_listing())
    official["neck.convs.1.conv.weight"] = torch.zeros(256, 512, 1, 1)
    with pytest.raises(
        ConversionError,
        match=r"shape mismatch for neck\.convs\.1\.conv\.weight .*\(256, 512, 1, 1\).*\(256, 1024, 1, 1\)",
    ):
        _convert_r50(official, r50_reference)
    official = zeros_state_dict(official_listing())
    official["bbox_head.reg_branches.2.4.weight"] = torch.zeros(5, 256)
    with pytest.raises(
        ConversionError, match=re.escape("bbox_head.reg_branches.2.4.weight -> reg_branches.2.layers.2.weight")
    ):
        _convert_r50(official, r50_reference)


def test_differing_mask_branch_copies_fail_naming_them(r50_reference):
    official = zeros_state_dict(official_listing())
    official["bbox_head.seg_branches.3.2.bias"] = torch.full((256,), 1e-3)
    with pytest.raises(ConversionError, match=re.escape("bbox_head.seg_branches.3.2.bias")):
        convert_official_state_dict(official)
    official = zeros_state_dict(official_listing())
    del official["bbox_head.seg_branches.5.4.weight"]
    with pytest.raises(ConversionError, match=re.escape("bbox_head.seg_branches.5.4.weight")):
        _convert_r50(official, r50_reference)
    # identical copies merge into the one shared branch, whatever their values
    official = zeros_state_dict(official_listing())
    for i in range(6):
        official[f"bbox_head.seg_branches.{i}.4.bias"] = torch.arange(441.0)
    converted = _convert_r50(official, r50_reference)
    assert torch.equal(converted["mask_branch.layers.2.bias"], torch.arange(441.0))


# ------------------------------------------------------------------------------- files
@pytest.fixture(scope="module")
def fixture_ref():
    return torch.load(shared_file("fixtures", "official_small.pt"), weights_only=True)


def small_config(dropout=0.1):
    """Our config of the fixture's variant, written out independently of the converter's
    architecture inference: R-18 (FrozenBN, res3-5), 2+2 layers, 1 mask-encoder layer,
    50 queries, 80 classes, the official padding behaviour."""
    cfg = LazyConfig.load(R50_CONFIG).model
    cfg.backbone.stages.depth = 18
    cfg.backbone.stages.pop("stride_in_1x1")
    cfg.neck.in_channels = [128, 256, 512]
    cfg.transformer.num_encoder_layers = 2
    cfg.transformer.num_decoder_layers = 2
    cfg.transformer.num_queries = 50
    cfg.transformer.dropout = dropout
    cfg.mask_encoder.num_layers = 1
    cfg.mask_encoder.dropout = dropout
    cfg.num_classes = 80
    cfg.inference_padding = "official"
    cfg.criterion.mask_loss_padding = "official"
    return cfg


def test_convert_tool_writes_a_strictly_loadable_checkpoint(tmp_path, fixture_ref, capsys):
    main = load_tool("convert_official").main

    src = tmp_path / "official.pth"
    torch.save({"state_dict": fixture_ref["state_dict"], "meta": {"epoch": 50, "mmdet_version": "2.25.0"}}, src)
    out = tmp_path / "converted.pth"
    assert main([str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    for line in ("tensors converted: 247", "dropped: 20 ", "2 identical copies", "ResNet-18", "decoder layers 2"):
        assert line in printed, printed
    data = torch.load(out, weights_only=True)
    assert data["__author__"] == AUTHOR and data["matching_heuristics"] is False
    assert data["official_meta"] == {"epoch": 50, "mmdet_version": "2.25.0"}
    assert len(data["model"]) == 273 - 20 - 6  # 20 BN step counters dropped, one mask-branch copy merged

    model = instantiate(small_config())
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(out)))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    # the public entry point reads it as a detectron2 checkpoint (no name-matching heuristics)
    rest = DetectionCheckpointer(instantiate(small_config())).load(str(out))
    assert rest["__author__"] == AUTHOR
    sd = model.state_dict()
    for official_key in (
        "bbox_head.transformer.decoder.layers.1.attentions.1.value_proj.weight",
        "backbone.layer2.1.bn2.running_var",
    ):
        torch.testing.assert_close(sd[official_to_ours(official_key)], fixture_ref["state_dict"][official_key].float())

    # an existing output is kept unless --overwrite
    stamp = os.path.getmtime(out)
    assert main([str(src), str(out)]) == 2
    assert os.path.getmtime(out) == stamp
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_checkpoint(str(src), str(out))
    # a bare state dict converts too
    torch.save(fixture_ref["state_dict"], src)
    assert main([str(src), str(out), "--overwrite"]) == 0
    assert torch.load(out, weights_only=True)["model"].keys() == data["model"].keys()


class _NotATensor:
    pass


def test_checkpoint_needing_full_unpickling_gives_a_clear_error(tmp_path):
    src = tmp_path / "odd.pth"
    torch.save({"state_dict": {}, "meta": _NotATensor()}, src)
    with pytest.raises(ConversionError, match=r"(?s)_NotATensor.*trust_pickle=True"):
        convert_checkpoint(str(src), str(tmp_path / "out.pth"))
    assert not (tmp_path / "out.pth").exists()
    assert load_tool("convert_official").main([str(src), str(tmp_path / "out.pth")]) == 1
    # opting in to full unpickling reads it
    state, meta = load_official_checkpoint(str(src), trust_pickle=True)
    assert state == {} and type(meta).__name__ == "_NotATensor"


def test_files_that_are_not_checkpoints_are_named_without_steering_to_trust_pickle(tmp_path, capsys):
    good = tmp_path / "good.pth"
    torch.save({"state_dict": {"a": torch.ones(2)}}, good)
    cases = {"random.pth": os.urandom(3000), "text.pth": b"a text file\n", "truncated.pth": good.read_bytes()[:200]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    for name in [*cases, "missing.pth"]:
        assert load_tool("convert_official").main([str(tmp_path / name), str(tmp_path / "out.pth")]) == 1
        err = capsys.readouterr().err
        assert str(tmp_path / name) in err and "trust" not in err, err
        assert ("does not exist" if name == "missing.pth" else "not a readable checkpoint") in err
    assert not (tmp_path / "out.pth").exists()


def test_a_yaml_config_that_would_run_code_is_refused(fixture_ref, tmp_path, capsys):
    src, out, marker = tmp_path / "official.pth", tmp_path / "out.pth", tmp_path / "executed"
    torch.save({"state_dict": fixture_ref["state_dict"]}, src)
    config = tmp_path / "model.yaml"
    config.write_text(f"model: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    assert load_tool("convert_official").main([str(src), str(out), "--config-file", str(config)]) == 1
    err = capsys.readouterr().err
    assert str(config) in err and "--trust-config" in err
    assert not marker.exists() and not out.exists()


# ------------------------------------------------------------------------------ parity
@pytest.fixture(scope="module")
def small_model(fixture_ref):
    official = fixture_ref["state_dict"]
    arch = infer_architecture(official)
    assert arch["depth"] == 18 and arch["out_features"] == ["res3", "res4", "res5"]
    assert (arch["num_encoder_layers"], arch["num_decoder_layers"], arch["mask_encoder_layers"]) == (2, 2, 1)
    torch.manual_seed(0)
    model = instantiate(small_config(dropout=0.0))
    model.load_state_dict(convert_official_state_dict(official, reference=model.state_dict()), strict=True)
    return model


def unpack_masks(packed):
    shape = tuple(packed["shape"])
    bits = np.unpackbits(np.asarray(packed["packed"]), axis=-1, count=shape[-1]).astype(bool)
    return torch.from_numpy(bits.reshape(shape))


def test_official_fixture_inference_parity(small_model, fixture_ref):
    model = small_model.eval()
    for i, (image, expected) in enumerate(zip(fixture_ref["inputs"], fixture_ref["results"])):
        h, w = image.shape[1:]
        with torch.no_grad():
            images, padding = model.preprocess_image([{"image": image}])
            outputs, mask_inputs = model.forward_heads(images.tensor, padding)
            res = select_detections(outputs, mask_inputs, model.mask_head, model.max_detections)[0]
            inst = detections_at_output_size(res, (h, w), (h, w), mask_stride=model.mask_stride)
        # the same 100 (query, label) detections, in the same order
        assert torch.equal(res["queries"], expected["det_query"].long()), i
        assert torch.equal(res["labels"], expected["det_labels"].long()), i
        torch.testing.assert_close(outputs["pred_logits"][-1, 0], expected["cls_scores"], atol=1e-4, rtol=0)
        torch.testing.assert_close(outputs["pred_boxes"][-1, 0], expected["bbox_preds"], atol=1e-5, rtol=0)
        torch.testing.assert_close(mask_inputs["mask_feats"][0], expected["seg_memory"], atol=1e-4, rtol=0)
        torch.testing.assert_close(inst.scores, expected["det_bboxes"][:, 4], atol=1e-4, rtol=0)
        torch.testing.assert_close(inst.pred_boxes.tensor, expected["det_bboxes"][:, :4], atol=0.01, rtol=0)
        rows = expected["mask_logits_1_8"][expected["det_mask_row"].long()]
        torch.testing.assert_close(res["mask_logits"], rows, atol=1e-4, rtol=0)
        masks = unpack_masks(expected["masks"])
        assert inst.pred_masks.shape == masks.shape == (100, h, w)
        assert (inst.pred_masks != masks).float().mean().item() < 1e-3, i


OFFICIAL_LOSS_NAMES = {"loss_cls": "loss_cls", "loss_bbox": "loss_bbox", "loss_iou": "loss_giou"}
OFFICIAL_LOSS_NAMES.update(loss_mask_dice="loss_mask_dice", loss_mask_bce="loss_mask_bce")


def our_loss_name(official):
    if official.startswith("d0."):
        return OFFICIAL_LOSS_NAMES[official[3:]] + "_0"
    if official.startswith("enc_"):
        return OFFICIAL_LOSS_NAMES[official[4:]] + "_enc"
    return OFFICIAL_LOSS_NAMES[official]


def test_official_fixture_training_losses_parity(small_model, fixture_ref):
    model = small_model.train()  # FrozenBN backbone: no batch statistics
    for m in model.modules():
        assert not isinstance(m, nn.Dropout) or m.p == 0
        assert not isinstance(m, nn.MultiheadAttention) or m.dropout == 0
    train = fixture_ref["train"]
    batch = []
    for image, boxes, labels, packed in zip(
        fixture_ref["inputs"], train["gt_bboxes"], train["gt_labels"], train["gt_masks"]
    ):
        inst = Instances(tuple(image.shape[1:]))
        inst.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32))
        inst.gt_classes = torch.as_tensor(labels, dtype=torch.long)
        inst.gt_masks = BitMasks(unpack_masks(packed))
        batch.append({"image": image, "instances": inst})
    with torch.no_grad():
        losses = model(batch)
    expected = train["losses"]
    assert len(expected) == 13
    assert sorted(losses) == sorted(our_loss_name(k) for k in expected)
    for name, value in expected.items():
        ours = losses[our_loss_name(name)].item()
        assert abs(ours - value) <= 1e-4 * abs(value), (name, ours, value)
