"""Deformable transformer (encoder, two-stage proposals, refining decoder) and mask encoder."""
import re

import pytest
from conftest import (
    C,
    K,
    LAYERS,
    LEVEL_SIZES,
    Q,
    has_gradient_path,
    head_boxes,
    level_masks,
    make_branches,
    make_inputs,
    shared_file,
)
import torch
import torch.nn.functional as F
from torch import nn

from soit.layers import MSDeformAttn
from soit.modeling.mask_encoder import MaskEncoder
from soit.modeling.transformer import DeformableTransformer, encoder_reference_points, valid_ratios_from_mask

def make_tiny(two_stage=True, box_refine=True):
    torch.manual_seed(0)
    tr = DeformableTransformer(
        embed_dim=C,
        num_heads=4,
        num_levels=len(LEVEL_SIZES),
        num_points=2,
        num_encoder_layers=LAYERS,
        num_decoder_layers=LAYERS,
        ffn_dim=64,
        dropout=0.0,
        num_queries=Q,
        two_stage=two_stage,
        box_refine=box_refine,
    )
    return (tr, *make_branches(LAYERS + 1))


@pytest.mark.parametrize("two_stage", [True, False])
@pytest.mark.parametrize("box_refine", [True, False])
def test_output_shapes(two_stage, box_refine):
    tr, cls, reg = make_tiny(two_stage, box_refine)
    feats, masks = make_inputs()
    out = tr(feats, masks, cls, reg)
    s = sum(h * w for h, w in LEVEL_SIZES)
    expected = {
        "hs": (LAYERS, 2, Q, C),
        "init_reference": (2, Q, 4 if two_stage else 2),
        "inter_references": (LAYERS, 2, Q, 4),
        "memory": (2, s, C),
        "pos": (2, s, C),
        "memory_padding_mask": (2, s),
        "spatial_shapes": (3, 2),
        "level_start_index": (3,),
        "valid_ratios": (2, 3, 2),
    }
    if two_stage:
        expected.update(enc_outputs_class=(2, s, K), enc_outputs_coord=(2, s, 4))
    assert {k: tuple(v.shape) for k, v in out.items()} == expected
    assert out["spatial_shapes"].tolist() == [list(hw) for hw in LEVEL_SIZES]
    assert out["level_start_index"].tolist() == [0, 192, 240]
    torch.testing.assert_close(out["valid_ratios"][1], torch.tensor([[10 / 16, 9 / 12], [5 / 8, 5 / 6], [3 / 4, 1.0]]))
    for v in out.values():
        assert not v.is_floating_point() or torch.isfinite(v).all()


def test_branch_count_errors():
    tr, cls, reg = make_tiny()
    feats, masks = make_inputs()
    with pytest.raises(ValueError, match="reg_branches"):
        tr(feats, masks, cls, reg[:LAYERS])
    with pytest.raises(ValueError, match="3 feature maps"):
        tr(feats[:2], masks[:2], cls, reg)


def test_encoder_reference_points_and_valid_ratios():
    masks = level_masks([[(4, 6), (2, 3)]], sizes=[(4, 8), (2, 4)])
    vr = torch.stack([valid_ratios_from_mask(m) for m in masks], 1)
    torch.testing.assert_close(vr, torch.tensor([[[6 / 8, 1.0], [3 / 4, 1.0]]]))
    ref = encoder_reference_points(masks, vr)
    assert ref.shape == (1, 32 + 8, 2, 2)
    # token (y=1, x=2) of level 0: centre (2.5 / 6, 1.5 / 4) of the valid region, scaled per level
    torch.testing.assert_close(ref[0, 1 * 8 + 2], torch.tensor([[2.5 / 6 * 0.75, 1.5 / 4], [2.5 / 6 * 0.75, 1.5 / 4]]))


def test_encoder_proposals_hand_computed():
    tr, _, _ = make_tiny()
    tr.eval()
    # level 0: 60 columns of which 56 valid, so that border tokens fall outside (0.01, 0.99)
    masks = level_masks([[(2, 56), (1, 28), (1, 14)]], sizes=[(2, 60), (1, 30), (1, 15)])
    flat = torch.cat([m.flatten(1) for m in masks], 1)
    memory = torch.randn(1, flat.shape[1], C)
    out_memory, proposals = tr.gen_encoder_proposals(memory, masks, flat)

    expected_valid, boxes = [], []
    for lvl, m in enumerate(masks):
        h, w = m.shape[1:]
        vh, vw = int((~m[0, :, 0]).sum()), int((~m[0, 0, :]).sum())
        for y in range(h):
            for x in range(w):
                box = [(x + 0.5) / vw, (y + 0.5) / vh, 0.05 * 2**lvl, 0.05 * 2**lvl]
                boxes.append(box)
                expected_valid.append(bool(not m[0, y, x] and all(0.01 < b < 0.99 for b in box)))
    valid = torch.tensor(expected_valid)
    # the border tokens of level 0 (x = 0 and x = 55) and the padding are invalid
    assert not valid[0] and not valid[55] and valid[1] and valid[54] and not valid[56:60].any()
    assert torch.equal(valid[120:], ~flat[0, 120:])  # levels 1, 2: only the padding is invalid
    boxes = torch.tensor(boxes)
    torch.testing.assert_close(proposals[0, valid], torch.logit(boxes[valid].double()).float())
    assert torch.isinf(proposals[0, ~valid]).all() and (proposals[0, ~valid] > 0).all()
    # invalid tokens' memory is zeroed before the projection
    zeroed = tr.enc_output_norm(tr.enc_output(torch.zeros(C)))
    torch.testing.assert_close(out_memory[0, ~valid], zeroed.expand(int((~valid).sum()), -1))
    torch.testing.assert_close(out_memory[0, valid], tr.enc_output_norm(tr.enc_output(memory[0, valid])))


def test_two_stage_queries_are_top_proposals():
    tr, cls, reg = make_tiny()
    feats, masks = make_inputs()
    out = tr(feats, masks, cls, reg)
    top = out["enc_outputs_class"][..., 0].topk(Q, dim=1)[1]
    top_boxes = out["enc_outputs_coord"].gather(1, top[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(out["init_reference"], top_boxes)
    assert not out["init_reference"].requires_grad  # the proposals are detached
    torch.testing.assert_close(out["inter_references"][0], out["init_reference"])
    # invalid tokens carry a +inf proposal, so their boxes are 1.0
    assert (out["enc_outputs_coord"][1][out["memory_padding_mask"][1]] == 1).all()


@pytest.mark.parametrize("two_stage", [True, False])
def test_box_refinement_updates_and_detaches_references(two_stage):
    tr, cls, reg = make_tiny(two_stage, box_refine=True)
    feats, masks = make_inputs()
    out = tr(feats, masks, cls, reg)
    refs = out["inter_references"]
    if not two_stage:
        # the learned points enter as (x, y, 0.5, 0.5); they are trained through the head
        torch.testing.assert_close(refs[0][..., :2], out["init_reference"])
        assert (refs[0][..., 2:] == 0.5).all() and has_gradient_path(refs[0], [tr])
    for lvl in range(1, LAYERS):
        # layer l starts from layer l-1's boxes, without the gradient path
        torch.testing.assert_close(refs[lvl], head_boxes(out, reg, lvl - 1))
        assert not has_gradient_path(refs[lvl], [tr, reg])
        assert (refs[lvl] - refs[lvl - 1]).abs().max() > 1e-3

    tr, cls, reg = make_tiny(two_stage, box_refine=False)
    out = tr(feats, masks, cls, reg)
    for lvl in range(LAYERS):
        init = out["init_reference"]
        torch.testing.assert_close(out["inter_references"][lvl][..., : init.shape[-1]], init)


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("two_stage", [True, False])
def test_gradients_reach_every_parameter(two_stage):
    tr, cls, reg = make_tiny(two_stage, box_refine=True)
    # At initialisation the deformable attentions' offset and weight layers are zero, so a
    # query (and the level embedding inside it) cannot change their output yet; perturb them
    # to check the wiring rather than the first step.
    for m in tr.modules():
        if isinstance(m, MSDeformAttn):
            nn.init.normal_(m.sampling_offsets.weight, std=0.01)
            nn.init.normal_(m.attention_weights.weight, std=0.01)
    feats, masks = make_inputs()
    out = tr(feats, masks, cls, reg)
    # The decoder outputs alone: enc_output / enc_output_norm feed only the proposal scores
    # and boxes, whose top-k selection is detached, so they legitimately get no gradient
    # here; the refinement chain is detached too, so reg_branches[0] gets none from layer 1.
    out["hs"][-1].pow(2).sum().backward(retain_graph=True)
    no_grad = {n for n, g in _grads(tr).items() if g is None or g.abs().sum() == 0}
    proposal_only = {"enc_output.weight", "enc_output.bias", "enc_output_norm.weight", "enc_output_norm.bias"}
    assert no_grad == (proposal_only if two_stage else set())
    assert all(p.grad is None for p in reg[0].parameters())

    # The full loss (every layer's class/box outputs and the proposals) reaches every parameter.
    tr.zero_grad()
    loss = sum(cls[lvl](out["hs"][lvl]).sum() + head_boxes(out, reg, lvl).sum() for lvl in range(LAYERS))
    if two_stage:
        loss = loss + out["enc_outputs_class"].sum() + out["enc_outputs_coord"].sum()
    loss.backward()
    assert [n for n, g in _grads(tr).items() if g is None or g.abs().sum() == 0] == []


# Official R-50 transformer tensors (name -> shape), from the authors' checkpoint
# (`bbox_head.transformer.` prefix removed); layers repeat with index {i}.
_MSDA = lambda p, h, lv: {  # noqa: E731
    f"{p}.sampling_offsets.weight": (h * lv * 4 * 2, 256),
    f"{p}.sampling_offsets.bias": (h * lv * 4 * 2,),
    f"{p}.attention_weights.weight": (h * lv * 4, 256),
    f"{p}.attention_weights.bias": (h * lv * 4,),
    f"{p}.value_proj.weight": (256, 256),
    f"{p}.value_proj.bias": (256,),
    f"{p}.output_proj.weight": (256, 256),
    f"{p}.output_proj.bias": (256,),
}
_FFN_NORMS = lambda p, n: {  # noqa: E731
    f"{p}.ffns.0.layers.0.0.weight": (1024, 256),
    f"{p}.ffns.0.layers.0.0.bias": (1024,),
    f"{p}.ffns.0.layers.1.weight": (256, 1024),
    f"{p}.ffns.0.layers.1.bias": (256,),
    **{f"{p}.norms.{j}.{w}": (256,) for j in range(n) for w in ("weight", "bias")},
}
OFFICIAL_TRANSFORMER_R50 = {
    "level_embeds": (4, 256),
    **{
        k: v
        for i in range(6)
        for k, v in {**_MSDA(f"encoder.layers.{i}.attentions.0", 8, 4), **_FFN_NORMS(f"encoder.layers.{i}", 2)}.items()
    },
    **{
        k: v
        for i in range(6)
        for k, v in {
            f"decoder.layers.{i}.attentions.0.attn.in_proj_weight": (768, 256),
            f"decoder.layers.{i}.attentions.0.attn.in_proj_bias": (768,),
            f"decoder.layers.{i}.attentions.0.attn.out_proj.weight": (256, 256),
            f"decoder.layers.{i}.attentions.0.attn.out_proj.bias": (256,),
            **_MSDA(f"decoder.layers.{i}.attentions.1", 8, 4),
            **_FFN_NORMS(f"decoder.layers.{i}", 3),
        }.items()
    },
    "enc_output.weight": (256, 256),
    "enc_output.bias": (256,),
    "enc_output_norm.weight": (256,),
    "enc_output_norm.bias": (256,),
    "pos_trans.weight": (512, 512),
    "pos_trans.bias": (512,),
    "pos_trans_norm.weight": (512,),
    "pos_trans_norm.bias": (512,),
}
OFFICIAL_MASK_ENCODER_R50 = {
    **_MSDA("seg_encoder.layers.0.attentions.0", 1, 1),
    **_FFN_NORMS("seg_encoder.layers.0", 2),
    "mask_trans.weight": (8, 256),
    "mask_trans.bias": (8,),
    "mask_trans_norm.weight": (8,),
    "mask_trans_norm.bias": (8,),
}

# Our names -> the official ones: a pure renaming.
_RULES = [
    (r"^(encoder|seg_encoder)\.layers\.(\d+)\.self_attn\.", r"\1.layers.\2.attentions.0."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.", r"decoder.layers.\1.attentions.0.attn."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.", r"decoder.layers.\1.attentions.1."),
    (r"\.ffn\.linear1\.", ".ffns.0.layers.0.0."),
    (r"\.ffn\.linear2\.", ".ffns.0.layers.1."),
    (r"\.norm1\.", ".norms.0."),
    (r"\.norm2\.", ".norms.1."),
    (r"\.norm3\.", ".norms.2."),
]


def official_name(key, mask_encoder=False):
    if mask_encoder:
        key = re.sub(r"^layers\.", "seg_encoder.layers.", key)
        key = re.sub(r"^proj\.", "mask_trans.", key)
        key = re.sub(r"^norm\.", "mask_trans_norm.", key)
    for pattern, repl in _RULES:
        key = re.sub(pattern, repl, key)
    return key


def _find_data(name):
    return shared_file("fixtures", name) if name.endswith(".pt") else shared_file(name)


def test_default_parameter_shapes_match_official():
    ours = {official_name(k): tuple(v.shape) for k, v in DeformableTransformer().state_dict().items()}
    assert ours == OFFICIAL_TRANSFORMER_R50
    ours = {official_name(k, True): tuple(v.shape) for k, v in MaskEncoder().state_dict().items()}
    assert ours == OFFICIAL_MASK_ENCODER_R50


def test_official_key_table_matches_checkpoint_listing():
    prefix = "bbox_head.transformer."
    listed = {}
    with open(_find_data("official_keys_r50.txt")) as f:
        for line in f:
            name, shape = line.rstrip("\n").split("\t")
            if name.startswith(prefix):
                listed[name[len(prefix) :]] = tuple(int(s) for s in re.findall(r"\d+", shape))
    assert listed == {**OFFICIAL_TRANSFORMER_R50, **OFFICIAL_MASK_ENCODER_R50}


@pytest.mark.parametrize("num_layers,mask_channels", [(0, 8), (1, 8), (2, 4)])
def test_mask_encoder(num_layers, mask_channels):
    tr, cls, reg = make_tiny()
    feats, masks = make_inputs()
    out = tr(feats, masks, cls, reg)
    torch.manual_seed(0)
    enc = MaskEncoder(C, mask_channels, num_layers, ffn_dim=64, dropout=0.0)
    f_mask = enc(out["memory"], out["pos"], masks[0], out["valid_ratios"])
    assert f_mask.shape == (2, mask_channels, *LEVEL_SIZES[0])
    # the P3 slice alone and level-0 valid ratios give the same result
    n3 = LEVEL_SIZES[0][0] * LEVEL_SIZES[0][1]
    p3_only = enc(out["memory"][:, :n3], out["pos"][:, :n3], masks[0], out["valid_ratios"][:, 0])
    torch.testing.assert_close(p3_only, f_mask)
    if num_layers == 0:  # paper Table 4's "0 layers": Linear + LayerNorm on P3
        expected = enc.norm(enc.proj(out["memory"][:, :n3])).transpose(1, 2).reshape_as(f_mask)
        torch.testing.assert_close(f_mask, expected)


def test_encoder_and_mask_encoder_padding_invariance():
    """An image's valid tokens are encoded the same alone and padded in a batch."""
    tr, _, _ = make_tiny()
    tr.eval()
    enc = MaskEncoder(C, 8, 1, ffn_dim=64, dropout=0.0).eval()
    alone_sizes = [(9, 10), (5, 5), (3, 3)]
    g = torch.Generator().manual_seed(3)
    alone = [torch.randn(1, C, h, w, generator=g) for h, w in alone_sizes]
    padded = [F.pad(f, (0, w - f.shape[-1], 0, h - f.shape[-2])) for f, (h, w) in zip(alone, LEVEL_SIZES)]
    padded = [torch.cat([torch.randn_like(p), p]) for p in padded]  # a full image first
    runs = []
    for feats, masks in ((alone, level_masks([alone_sizes], alone_sizes)), (padded, make_inputs()[1])):
        with torch.no_grad():
            out = tr(feats, masks, *make_branches(LAYERS + 1))
            f_mask = enc(out["memory"], out["pos"], masks[0], out["valid_ratios"])
        starts = out["level_start_index"].tolist()
        sizes = [f.shape[-2:] for f in feats]
        levels = [out["memory"][-1, s : s + h * w].reshape(h, w, C) for s, (h, w) in zip(starts, sizes)]
        runs.append(([lv[:vh, :vw] for lv, (vh, vw) in zip(levels, alone_sizes)], f_mask[-1, :, :9, :10]))
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_shape_dependent_helpers_trace_with_dynamic_shapes():
    tr, _, _ = make_tiny()
    tr.eval().requires_grad_(False)

    def fn(memory, m0, m1):
        masks = [m0, m1]
        flat = torch.cat([m.flatten(1) for m in masks], 1)
        vr = torch.stack([valid_ratios_from_mask(m) for m in masks], 1)
        return (*tr.gen_encoder_proposals(memory, masks, flat), encoder_reference_points(masks, vr))

    def example(sizes, valid):
        masks = level_masks(valid, sizes)
        return (torch.randn(len(valid), sum(h * w for h, w in sizes), C), *masks)

    traced = torch.jit.trace(fn, example([(4, 6), (2, 3)], [[(4, 6), (2, 3)], [(3, 4), (2, 2)]]))
    other = example([(7, 5), (4, 3)], [[(7, 5), (4, 3)], [(5, 2), (3, 1)], [(2, 4), (1, 2)]])
    for a, b in zip(traced(*other), fn(*other)):
        torch.testing.assert_close(a, b)


def test_matches_official_implementation():
    """Backbone -> neck -> transformer -> mask encoder with the authors' weights reproduce
    their padded-batch head outputs (last-layer logits and boxes, F_mask)."""
    torchvision = pytest.importorskip("torchvision")
    from soit.modeling.neck import ChannelMapper

    ref = torch.load(_find_data("official_small.pt"), weights_only=True)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in ref["state_dict"].items()}

    def sub(prefix):
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}

    backbone = torchvision.models.resnet18()
    assert backbone.load_state_dict(sub("backbone."), strict=False).missing_keys == ["fc.weight", "fc.bias"]
    neck = ChannelMapper([128, 256, 512])
    neck.load_state_dict(sub("neck."))
    tr = DeformableTransformer(num_encoder_layers=2, num_decoder_layers=2, num_queries=50)
    tr.load_state_dict({k: sd["bbox_head.transformer." + official_name(k)] for k in tr.state_dict()})
    enc = MaskEncoder()
    enc.load_state_dict({k: sd["bbox_head.transformer." + official_name(k, True)] for k in enc.state_dict()})
    cls, reg = make_branches(3, c=256, k=80)
    cls.load_state_dict(sub("bbox_head.cls_branches."))
    reg.load_state_dict(sub("bbox_head.reg_branches."))

    mean = torch.tensor(ref["normalization"]["mean"]).view(3, 1, 1)
    std = torch.tensor(ref["normalization"]["std"]).view(3, 1, 1)
    for m in (backbone, neck, tr, enc, cls, reg):
        m.eval()

    def run(inputs, pad_to):
        images, img_mask = torch.zeros(len(inputs), 3, *pad_to), torch.ones(len(inputs), *pad_to)
        for i, im in enumerate(inputs):
            h, w = im.shape[1:]
            images[i, :, :h, :w] = (im.float() - mean) / std
            img_mask[i, :h, :w] = 0
        with torch.no_grad():
            x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(images))))
            c3 = backbone.layer2(backbone.layer1(x))
            c4 = backbone.layer3(c3)
            feats = neck([c3, c4, backbone.layer4(c4)])
            masks = [F.interpolate(img_mask[None], size=f.shape[-2:])[0].bool() for f in feats]
            out = tr(feats, masks, cls, reg)
            f_mask = enc(out["memory"], out["pos"], masks[0], out["valid_ratios"])
            return masks[0], cls[1](out["hs"][1]), head_boxes(out, reg, 1), f_mask

    # logits reach 12.8 and F_mask 2.9: the tolerances allow float32 summation-order differences
    expected = ref["batch_forward"]
    p3_mask, logits, boxes, f_mask = run(ref["inputs"], (256, 320))  # padded batch
    assert torch.equal(p3_mask, expected["seg_mask"])
    torch.testing.assert_close(logits, expected["cls_scores"], atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes, expected["bbox_preds"], atol=1e-5, rtol=0)
    torch.testing.assert_close(f_mask, expected["seg_memory"], atol=1e-4, rtol=0)
    expected = ref["results"][2]  # one image alone, no padding
    p3_mask, logits, boxes, f_mask = run(ref["inputs"][2:], expected["size"])
    assert not p3_mask.any()
    torch.testing.assert_close(logits[0], expected["cls_scores"], atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes[0], expected["bbox_preds"], atol=1e-5, rtol=0)
    torch.testing.assert_close(f_mask[0], expected["seg_memory"], atol=1e-4, rtol=0)
