"""tools/analyze_model.py and soit/analysis.py: parameters, FLOPs with the deformable
attention counted (checked against a count by hand), activations."""
import math
import os

import pytest
import torch
from conftest import REPO, load_tool, tiny_model

from soit.analysis import flop_count_analysis
from soit.layers.ms_deform_attn import MSDeformAttn

analyze_model = load_tool("analyze_model")


def _deform_attn_flops_by_hand(model, h, w):
    """5 multiply-adds per sampling point and channel (4 bilinear + 1 weight), for every
    MSDeformAttn of the transformer and the mask encoder, and for the mask head."""
    # level sizes of the neck outputs: strides 8, 16, 32 (+1 extra level at 64)
    sizes = []
    for stride in (8, 16, 32, 64)[: model.transformer.num_levels]:
        sizes.append((math.ceil(h / stride), math.ceil(w / stride)))
    tokens = sum(a * b for a, b in sizes)
    total = 0
    for name, m in model.named_modules():
        if not isinstance(m, MSDeformAttn):
            continue
        per_query = 5 * m.num_heads * m.num_levels * m.num_points * (m.embed_dim // m.num_heads)
        if name.startswith("transformer.encoder"):
            queries = tokens
        elif name.startswith("transformer.decoder"):
            queries = model.transformer.num_queries
        elif name.startswith("mask_encoder"):
            queries = sizes[0][0] * sizes[0][1]
        else:
            raise AssertionError(f"unexpected deformable attention {name}")
        total += queries * per_query
    head = model.mask_head
    k = min(model.max_detections, model.transformer.num_queries * model.num_classes)
    total += 5 * k * sizes[0][0] * sizes[0][1] * head.num_heads * head.num_points * (head.mask_channels // head.num_heads)
    return total


def test_flops_count_the_deformable_attention():
    model = tiny_model(num_classes=3).eval()
    h, w = 120, 152
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    with torch.no_grad():
        analysis = flop_count_analysis(model, image)
        by_op = analysis.by_operator()
    assert by_op["ms_deform_attn"] == _deform_attn_flops_by_hand(model, h, w)
    assert not analysis.unsupported_ops(), analysis.unsupported_ops()
    # the backbone's convolutions dominate this small model; all parts are counted
    by_module = analysis.by_module()
    for part in ("backbone", "neck", "transformer", "mask_encoder", "mask_head", "mask_branch"):
        assert by_module[f"model.{part}"] > 0, part


def test_analyze_model_tool_prints_all_three(capsys):
    cfg = os.path.join(REPO, "configs", "models", "soit_tiny.py")
    args = ["--config-file", cfg, "--tasks", "parameter", "flop", "activation", "--input-size", "96", "128"]
    assert analyze_model.main(args) == 0
    out = capsys.readouterr().out
    model = tiny_model(num_classes=80)
    assert f"checkpoint-equivalent parameters (parameters + FrozenBN affine): {sum(p.numel() for p in model.parameters()):,}" in out
    flops = next(line for line in out.splitlines() if line.startswith("FLOPs at 96x128: "))
    assert float(flops.split(": ")[1].split()[0]) > 0
    assert "ms_deform_attn" in out.split("FLOPs at")[1].split("activations at")[0]
    assert out.split("activations at")[0].count("uncounted operators: none") == 1
    assert "activations at 96x128:" in out


def test_analyze_model_tool_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        analyze_model.main(["--config-file", "configs/nope.py"])
    assert "configs/nope.py" in capsys.readouterr().err
    cfg = os.path.join(REPO, "configs", "models", "soit_tiny.py")
    with pytest.raises(SystemExit):
        analyze_model.main(["--config-file", cfg, "--tasks", "flops"])
    assert "flops" in capsys.readouterr().err
