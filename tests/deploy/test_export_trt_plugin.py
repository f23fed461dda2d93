"""ONNX export with the attention as TensorRT's MultiscaleDeformableAttnPlugin_TRT node: the
node as the plugin's contract describes it, and the graph with the node computed by our
reference equal to eager mode at two sizes (TensorRT itself is not available here)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import separated_tiny_model, synthetic_sample

from soit import export
from soit.layers.ms_deform_attn.trt_plugin import PLUGIN

SIZES = [(96, 128), (120, 88)]


def _image(h, w):
    shapes = [(0, h * 0.35, w * 0.4, h * 0.2, w * 0.18, (220, 60, 60)), (1, h * 0.7, w * 0.65, h * 0.15, w * 0.2, (60, 200, 90))]
    return synthetic_sample(h, w, shapes)["image"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = separated_tiny_model()
    path = str(tmp_path_factory.mktemp("trt") / "model.onnx")
    names = export.export_onnx(model, _image(*SIZES[0]), path, attention="trt_plugin")
    return model, path, names


def test_the_nodes_follow_the_plugin_contract(exported):
    model, path, _ = exported
    graph = onnx.load(path).graph
    nodes = [n for n in graph.node if n.op_type == PLUGIN["op_type"]]
    # encoder layer, two decoder layers, mask-encoder layer, mask head
    assert len(nodes) == 5 and not any(n.op_type == "GridSample" for n in graph.node)
    counts = export.onnx_op_counts(path)
    assert counts[f"{PLUGIN['domain']}::{PLUGIN['op_type']}"] == 5
    for node in nodes:
        assert node.domain == "trt.plugins" and len(node.input) == 5 and len(node.output) == 1
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"plugin_version": b"1", "plugin_namespace": b""}

    seen = []

    def check(node, inputs, output):
        value, shapes, starts, loc, weights = inputs
        assert [a.ndim for a in inputs] == list(PLUGIN["ranks"])
        assert value.dtype == loc.dtype == weights.dtype == output.dtype == np.float32
        assert shapes.dtype == starts.dtype == np.int32
        N, S, M, D = value.shape
        L = shapes.shape[0]
        assert shapes.shape == (L, 2) and starts.shape == (L,)
        assert loc.shape[0] == weights.shape[0] == N and loc.shape[2] == weights.shape[2] == M
        assert loc.shape[3] == weights.shape[3] == L and loc.shape[4] == weights.shape[4] and loc.shape[5] == 2
        assert loc.shape[1] == weights.shape[1]
        assert output.shape == (N, loc.shape[1], M, D)
        assert int((shapes[:, 0] * shapes[:, 1]).sum()) == S and starts[0] == 0
        assert (np.diff(starts) == (shapes[:-1, 0] * shapes[:-1, 1])).all()
        seen.append((L, M))

    export.run_onnx_with_reference_plugin(path, _image(*SIZES[0]).numpy(), on_plugin=check)
    levels = model.transformer.num_levels
    assert seen == [(levels, 8), (levels, 8), (levels, 8), (1, 1), (1, model.mask_head.num_heads)]


@pytest.mark.parametrize("size", SIZES)
def test_with_the_node_computed_by_our_reference_the_graph_equals_eager(exported, size):
    model, path, names = exported
    image = _image(*size)
    got = export.instances_from_outputs(export.run_onnx_with_reference_plugin(path, image.numpy()), names)
    with torch.no_grad():
        eager = model.inference([{"image": image}], do_postprocess=False)[0]
    diffs = export.max_differences(eager, got)
    assert diffs["pred_classes"] == 0 and diffs["scores"] < 1e-5 and diffs["pred_boxes"] < 1e-3, diffs
    assert diffs["pred_masks"] < 1e-4, diffs


def test_onnx_runtime_alone_refuses_the_node(exported):
    with pytest.raises(Exception, match="MultiscaleDeformableAttnPlugin_TRT|trt.plugins"):
        ort.InferenceSession(exported[1], providers=["CPUExecutionProvider"])
