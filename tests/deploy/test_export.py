"""Export through TracingAdapter: TorchScript and ONNX graphs equal eager mode at the traced
size and at other sizes and aspect ratios; tools/deploy/export_model.py end to end."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import REPO, load_tool, separated_tiny_model, swin_tiny_model, synthetic_sample, tiny_model
from PIL import Image

from soit import export
from soit.layers.ms_deform_attn import has_cuda_kernel

EXPORT_TOOL = os.path.join(REPO, "tools", "deploy", "export_model.py")

# traced at 96 x 128 (landscape); checked there and at 120 x 88 (portrait) and 72 x 72
TRACE_SIZE = (96, 128)
OTHER_SIZES = [(120, 88), (72, 72)]


def _image(h, w):
    shapes = [(0, h * 0.35, w * 0.4, h * 0.2, w * 0.18, (220, 60, 60)), (1, h * 0.7, w * 0.65, h * 0.15, w * 0.2, (60, 200, 90))]
    return synthetic_sample(h, w, shapes)["image"]


@pytest.fixture(scope="module")
def model():
    return separated_tiny_model()


def _eager(model, image):
    with torch.no_grad():
        return model.inference([{"image": image}], do_postprocess=False)[0]


def _match(eager, got, box_atol):
    """Index in ``got`` of each eager detection: same class, score within 1e-5, closest box.
    Detections of (nearly) equal score may come in either order after rounding."""
    order, used = [], set()
    for i in range(len(eager)):
        close = (got.scores - eager.scores[i]).abs() <= 1e-5
        close &= got.pred_classes.long() == eager.pred_classes[i]
        dist = (got.pred_boxes.tensor - eager.pred_boxes.tensor[i]).abs().max(1).values
        candidates = [j for j in close.nonzero().flatten().tolist() if j not in used and dist[j] <= box_atol]
        assert candidates, f"eager detection {i} (score {eager.scores[i]:.6f}) has no exported counterpart"
        j = min(candidates, key=lambda c: dist[c].item())
        used.add(j)
        order.append(j)
    return torch.tensor(order, dtype=torch.long)


def _assert_same(eager, got, box_atol=1e-3, prob_atol=1e-4):
    assert tuple(int(v) for v in got.image_size) == tuple(eager.image_size)
    assert len(got) == len(eager)
    order = _match(eager, got, box_atol)
    torch.testing.assert_close(got.scores[order], eager.scores, rtol=0, atol=1e-5)
    assert got.pred_masks.shape == eager.pred_masks.shape
    torch.testing.assert_close(got.pred_masks[order], eager.pred_masks, rtol=0, atol=prob_atol)
    return order


def _assert_same_in_original_size(model, image, got, order, height, width):
    """The exported result, finished outside the graph, equals the eager model's forward."""
    with torch.no_grad():
        expected = model([{"image": image, "height": height, "width": width}])[0]["instances"]
    final = export.soit_postprocess(got, height, width, model.mask_threshold)[order]
    assert final.image_size == expected.image_size == (height, width)
    torch.testing.assert_close(final.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=0, atol=2e-3)
    assert final.pred_masks.dtype == torch.bool
    # pixels whose probability sits within float noise of the threshold may flip
    assert (final.pred_masks != expected.pred_masks).float().mean() < 1e-4


def test_torchscript_round_trip_equals_eager_at_other_sizes(model, tmp_path):
    path = str(tmp_path / "model.ts")
    _, names = export.export_torchscript(model, _image(*TRACE_SIZE), path)
    assert names == ["pred_boxes", "pred_classes", "pred_masks", "scores", "image_size"]
    assert not model.training, "exporting leaves the model in eval mode"
    loaded = torch.jit.load(path)
    assert "soit::ms_deform_attn" in str(loaded.inlined_graph)
    for h, w in [TRACE_SIZE] + OTHER_SIZES:
        image = _image(h, w)
        with torch.no_grad():
            got = export.instances_from_outputs(loaded(image), names)
        eager = _eager(model, image)
        assert eager.pred_masks.shape[-2:] == (h, w)
        order = _assert_same(eager, got, box_atol=1e-4, prob_atol=1e-6)
        _assert_same_in_original_size(model, image, got, order, 2 * h + 1, w + 7)


@pytest.mark.parametrize(
    "variant",
    ["single-stage", "no box refinement", "official padding", "swin backbone"],
)
def test_model_variants_trace_at_other_sizes(variant, tmp_path):
    torch.manual_seed(0)
    if variant == "single-stage":
        model = tiny_model(**{"two_stage": False, "transformer.two_stage": False})
    elif variant == "no box refinement":
        model = tiny_model(**{"with_box_refine": False, "transformer.box_refine": False})
    elif variant == "official padding":
        model = tiny_model(inference_padding="official")
    else:
        model = swin_tiny_model()
    model.eval()
    # Swin pads to its 7 x 7 windows (of stride-4 patches) inside the graph
    sizes = [(160, 224), (200, 152)] if variant == "swin backbone" else [TRACE_SIZE, OTHER_SIZES[0]]
    traced, names = export.export_torchscript(model, _image(*sizes[0]), str(tmp_path / "model.ts"))
    for h, w in sizes:
        image = _image(h, w)
        with torch.no_grad():
            got = export.instances_from_outputs(traced(image), names)
        diffs = export.max_differences(_eager(model, image), got)
        assert diffs["pred_classes"] == 0 and diffs["scores"] < 1e-5 and diffs["pred_boxes"] < 1e-3, diffs
        assert diffs["pred_masks"] < 1e-4, diffs


def test_torchscript_loads_in_a_fresh_process(model, tmp_path):
    path = str(tmp_path / "model.ts")
    _, names = export.export_torchscript(model, _image(*TRACE_SIZE), path)
    image = _image(*OTHER_SIZES[0])
    torch.save(image, tmp_path / "image.pt")
    script = textwrap.dedent(
        f"""
        import torch
        import soit.export  # registers soit::ms_deform_attn
        out = torch.jit.load({path!r})(torch.load({str(tmp_path / 'image.pt')!r}))
        torch.save([t for t in out], {str(tmp_path / 'out.pt')!r})
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    got = export.instances_from_outputs(torch.load(tmp_path / "out.pt"), names)
    _assert_same(_eager(model, image), got, box_atol=1e-4, prob_atol=1e-6)


@pytest.mark.parametrize("attention", ["grid_sample", "gather"])
def test_onnx_equals_eager_in_onnxruntime_at_two_sizes(model, tmp_path, attention):
    import onnx  # installed by scripts/setup.sh: a missing one fails here
    import onnxruntime as ort

    path = str(tmp_path / "model.onnx")
    names = export.export_onnx(model, _image(*TRACE_SIZE), path, opset=17, attention=attention)
    assert not model.training, "exporting leaves the model in eval mode"
    graph = onnx.load(path).graph
    ops = {node.op_type for node in graph.node}
    assert ("GridSample" in ops) == (attention == "grid_sample") and not any(node.domain == "soit" for node in graph.node)
    counts = export.onnx_op_counts(path)
    assert counts.get("GridSample", 0) == sum(node.op_type == "GridSample" for node in graph.node)
    assert sum(counts.values()) == len(graph.node) and list(counts.values()) == sorted(counts.values(), reverse=True)
    assert [o.name for o in graph.output] == names
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for h, w in [TRACE_SIZE, OTHER_SIZES[0]]:
        image = _image(h, w)
        got = export.instances_from_outputs(session.run(None, {export.INPUT_NAME: image.numpy()}), names)
        order = _assert_same(_eager(model, image), got)
        _assert_same_in_original_size(model, image, got, order, h, w)


def test_onnx_rejects_an_opset_without_grid_sample_and_unknown_formulations(model, tmp_path):
    with pytest.raises(ValueError, match="GridSample"):
        export.export_onnx(model, _image(*TRACE_SIZE), str(tmp_path / "m.onnx"), opset=13)
    with pytest.raises(ValueError, match="grid_sample.*gather"):
        export.export_onnx(model, _image(*TRACE_SIZE), str(tmp_path / "m.onnx"), attention="bilinear")


def test_trace_adapter_checks_its_input(model):
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        export.trace_adapter(model, torch.zeros(1, 3, 32, 32))


# ------------------------------------------------------------------------ the command line
def _run_tool(*args):
    return subprocess.run([sys.executable, EXPORT_TOOL, *args], capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="module")
def sample_image(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sample") / "sample.png")
    Image.fromarray(_image(160, 208).permute(1, 2, 0).numpy()).save(path)
    return path


@pytest.mark.parametrize(
    "fmt,file_name,attention",
    [
        ("torchscript", "model.ts", None), ("onnx", "model.onnx", "grid_sample"), ("onnx", "model.onnx", "gather"),
        ("onnx", "model.onnx", "trt_plugin"),
    ],  # fmt: skip
)
def test_export_tool_exports_the_r50_config(fmt, file_name, attention, sample_image, tmp_path):
    out = tmp_path / "exported"
    args = ["--config-file", "configs/models/soit_r50.py", "--format", fmt, "--export-method", "tracing"]
    args += ["--attention", attention] if attention else []
    args += ["--sample-image", sample_image, "--output", str(out), "model.max_detections=50"]
    res = _run_tool(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    path = out / file_name
    assert path.is_file() and str(path) in res.stdout, res.stdout
    info = json.loads((out / (file_name + ".json")).read_text())
    assert info["outputs"] == ["pred_boxes", "pred_classes", "pred_masks", "scores", "image_size"]
    assert info["traced_input_size"] == [160, 208] and info["input"]["channels"] == "RGB"
    # the tool's own comparison with eager mode ran and found the same detections
    check = next(line for line in res.stdout.splitlines() if "exported vs eager" in line)
    diffs = dict(part.rsplit(" ", 1) for part in check.split("max |difference|: ")[1].split(", "))
    assert float(diffs["pred_classes"]) == 0 and float(diffs["scores"]) < 1e-4, check
    if fmt == "onnx":  # the op inventory: GridSample only where asked for
        assert info["attention"] == attention
        grid_samples = int(next(line for line in res.stdout.splitlines() if "GridSample:" in line).rsplit(" ", 1)[1])
        assert (grid_samples > 0) == (attention == "grid_sample"), res.stdout
        assert ("TensorRT has been reported" in res.stdout) == (grid_samples > 0)  # said where it matters
    # the exported model has 50 detections: the override reached the model
    if fmt == "torchscript":
        loaded = torch.jit.load(str(path))
        # another size and aspect ratio (portrait), still >= 300 encoder tokens for the proposals
        image = torch.from_numpy(np.array(Image.open(sample_image))).permute(2, 0, 1)
        image = image.transpose(1, 2)[:, :200, :150].contiguous()
        with torch.no_grad():
            boxes, _, masks, _, size = loaded(image)
        assert boxes.shape == (50, 4) and masks.shape == (50, 200, 150) and size.tolist() == [200, 150]
    # an existing export is kept unless --overwrite
    before = path.stat().st_mtime_ns
    again = _run_tool(*args)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert path.stat().st_mtime_ns == before


def test_export_tool_rejects_bad_arguments(tmp_path):
    res = _run_tool("--config-file", "configs/nope.py", "--format", "onnx", "--output", str(tmp_path))
    assert res.returncode == 2 and "configs/nope.py" in res.stderr and "does not exist" in res.stderr
    res = _run_tool("--config-file", "configs/models/soit_tiny.py", "--format", "tflite", "--output", str(tmp_path))
    assert res.returncode == 2 and "tflite" in res.stderr and "onnx" in res.stderr and "torchscript" in res.stderr
    res = _run_tool(
        "--config-file", "configs/models/soit_tiny.py", "--format", "onnx", "--export-method", "scripting",
        "--output", str(tmp_path),
    )  # fmt: skip
    assert res.returncode == 2 and "scripting" in res.stderr and "tracing" in res.stderr
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------- GPU
@pytest.mark.skipif(
    not (torch.cuda.is_available() and has_cuda_kernel()),
    reason="needs a CUDA device and soit._C built with CUDA"
    + ("" if torch.cuda.is_available() else " (no CUDA device on this machine)"),
)
def test_traced_model_on_cuda_calls_our_kernel(model, tmp_path, monkeypatch):
    import importlib

    ext_mod = importlib.import_module("soit.layers.ms_deform_attn.extension")
    cuda_model = tiny_model(num_classes=3).eval()
    cuda_model.load_state_dict(model.state_dict())
    cuda_model.cuda()
    path = str(tmp_path / "model.ts")
    _, names = export.export_torchscript(cuda_model, _image(*TRACE_SIZE).cuda(), path)
    loaded = torch.jit.load(path)
    assert "soit::ms_deform_attn" in str(loaded.inlined_graph)
    calls = []
    ext = ext_mod.compiled_module()
    original = ext.ms_deform_attn_forward

    class Counting:
        def __getattr__(self, name):
            return getattr(ext, name)

        def ms_deform_attn_forward(self, *args):
            calls.append(args[0].shape)
            return original(*args)

    monkeypatch.setattr(ext_mod, "compiled_module", lambda: Counting())
    for h, w in [TRACE_SIZE] + OTHER_SIZES:
        image = _image(h, w).cuda()
        calls.clear()
        with torch.no_grad():
            got = export.instances_from_outputs(loaded(image), names)
        # encoder layer(s), decoder layers, mask encoder layer(s) and the mask head
        assert len(calls) >= 4, calls
        _assert_same(_eager(cuda_model, image), got, box_atol=1e-3, prob_atol=1e-4)


def test_max_differences_pairs_swapped_near_ties(model):
    eager = _eager(model, _image(*TRACE_SIZE))
    eager.scores = eager.scores.clone()
    eager.scores[:2] = eager.scores[0]  # a tie, which two runtimes may break differently
    swapped = eager[torch.tensor([1, 0] + list(range(2, len(eager))))]
    swapped.scores = swapped.scores.clone()
    swapped.scores[:2] += 1e-6
    diffs = export.max_differences(eager, swapped)
    assert diffs["pred_boxes"] == diffs["pred_masks"] == diffs["pred_classes"] == 0.0
    assert diffs["scores"] == pytest.approx(1e-6, abs=1e-7)
    with pytest.raises(AssertionError, match="image sizes differ"):
        export.max_differences(eager, _eager(model, _image(*OTHER_SIZES[1])))


def test_export_tool_resizes_the_sample_like_evaluation(sample_image):
    """The sample goes through the config's test-time resize (ResizeShortestEdge 800/1333 for
    COCO), in the model's channel order."""
    import types

    from detectron2.config import LazyConfig

    export_model = load_tool("deploy/export_model")

    cfg = LazyConfig.load(os.path.join(REPO, "configs", "soit_r50_50ep.py"))
    rgb, _ = export_model.sample_input(cfg, types.SimpleNamespace(input_format="RGB"), sample_image)
    bgr, _ = export_model.sample_input(cfg, types.SimpleNamespace(input_format="BGR"), sample_image)
    assert rgb.shape == (3, 800, 1040)  # 160 x 208 scaled to a short side of 800
    assert torch.equal(rgb.flip(0), bgr)
    synthetic, source = export_model.sample_input(cfg, types.SimpleNamespace(input_format="RGB"), None)
    assert synthetic.shape == (3, 800, 1067) and "synthetic" in source


def test_benchmark_export_runs_and_checks_the_exports():
    tool = os.path.join(REPO, "dev", "benchmark_export.py")
    args = ["--config-file", "configs/models/soit_tiny.py", "--input-size", "96", "128", "--runs", "1", "--markdown"]
    res = subprocess.run([sys.executable, tool, *args], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ") and not line.startswith("| runtime")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| eager (PyTorch)", "| TorchScript", "| onnxruntime (CPU), attention grid_sample",
        "| onnxruntime (CPU), attention gather",
    ]  # fmt: skip
    for row in rows[1:]:  # each export checked against eager: scores / boxes / masks
        scores, boxes, masks = (float(v) for v in row.split(" | ")[3].strip(" |").split(" / "))
        assert scores < 1e-5 and boxes < 1e-3 and masks < 1e-4, row


def test_r50_gather_export_equals_eager_in_onnxruntime_at_two_sizes(tmp_path):
    """The paper's R-50 model (random weights, detections of well separated scores need not
    hold: pairs are matched by score and box) exported without GridSample."""
    import onnxruntime as ort
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(os.path.join(REPO, "configs", "models", "soit_r50.py"))
    cfg.model.max_detections = 50
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    path = str(tmp_path / "r50.onnx")
    names = export.export_onnx(model, _image(160, 208), path, attention="gather")
    assert "GridSample" not in export.onnx_op_counts(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for h, w in [(160, 208), (200, 150)]:
        image = _image(h, w)
        got = export.instances_from_outputs(session.run(None, {export.INPUT_NAME: image.numpy()}), names)
        diffs = export.max_differences(_eager(model, image), got)
        assert diffs["pred_classes"] == 0 and diffs["scores"] < 1e-4 and diffs["pred_masks"] < 1e-4, diffs
        assert diffs["pred_boxes"] < 1e-3, diffs  # pixels, at coordinates up to 208
