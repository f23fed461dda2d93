"""Export SOIT through detectron2's ``TracingAdapter`` to TorchScript and ONNX.

What is traced is :meth:`SOIT.inference` with ``do_postprocess=False`` on one image: the
network-input image (3, H, W) in the model's ``input_format`` goes in; the detections in the
network input size come out, flattened as detectron2 flattens ``Instances`` (fields in sorted
order, then the image size):

    pred_boxes (k, 4) xyxy pixels, pred_classes (k,), pred_masks (k, H, W) mask probabilities,
    scores (k,), image_size (2,)

k = min(max_detections, queries x classes) is fixed. Resizing to the original image size
(:func:`soit.modeling.soit_postprocess`) stays outside the graph, as in detectron2's own
export. Every size in the graph is read from the input at run time, so an exported model runs
at input sizes other than the traced one.

TorchScript graphs hold the registered op ``soit::ms_deform_attn`` (``soit._C`` where it is
built, the PyTorch path elsewhere): ``import soit.export`` (or any ``soit`` module that
imports the op) before ``torch.jit.load``. ONNX graphs need nothing of ours: they express the
attention with ``GridSample`` (``attention="grid_sample"``) or with corner indices, ``Gather``
and element-wise products (``attention="gather"``: for runtimes that compute ``GridSample``
wrongly, docs/deployment.md); :func:`onnx_op_counts` lists what a graph holds.
"""
import json
import warnings
from typing import Dict, List, Sequence

import numpy as np
import torch
from detectron2.structures import Boxes, Instances

# importing the model imports soit.layers.ms_deform_attn, which registers soit::ms_deform_attn
from .layers.ms_deform_attn import EXPORT_FORMULATIONS, export_formulation
from .modeling.postprocessing import soit_postprocess

__all__ = [
    "INPUT_NAME",
    "trace_adapter",
    "output_names",
    "export_torchscript",
    "export_onnx",
    "onnx_op_counts",
    "run_onnx_with_reference_plugin",
    "instances_from_outputs",
    "write_export_info",
    "pair_detections",
    "max_differences",
    "soit_postprocess",
]

INPUT_NAME = "image"
# GridSample entered the standard ONNX operator set in opset 16
MIN_ONNX_OPSET = 16


def _inference(model, inputs):
    return model.inference(inputs, do_postprocess=False)[0]


def trace_adapter(model, image: torch.Tensor):
    """detectron2's ``TracingAdapter`` around ``model.inference(..., do_postprocess=False)``.

    Args:
        model: a SOIT model in eval mode.
        image: (3, H, W) uint8 or float tensor in ``model.input_format``, already resized as
            the model expects (the network input), on the model's device.
    """
    from detectron2.export import TracingAdapter

    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a (3, H, W) tensor, got {shape}")
    if model.training:
        raise ValueError("export needs the model in eval mode (call model.eval())")
    # in eval mode like the model: torch.onnx.export restores the wrapper's mode afterwards,
    # which would otherwise switch the model (its BatchNorm layers) to training
    return TracingAdapter(model, [{"image": image}], inference_func=_inference).eval()


def output_names(adapter) -> List[str]:
    """Names of the flattened outputs, in order (valid after the adapter has run once)."""
    schema = adapter.outputs_schema
    keys = getattr(schema, "keys", None)
    if keys is None:
        raise RuntimeError("run the adapter (trace it) before asking for its output names")
    return list(keys) + ["image_size"]


def _trace(adapter):
    with torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings name Python values frozen into the graph; the ones left come from
        # detectron2's structures (constant checks) and are harmless here
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.trace.*deprecated")
        return torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)


def export_torchscript(model, image: torch.Tensor, path: str):
    """Trace the model on ``image`` and save the TorchScript module at ``path``.

    Returns ``(traced, output_names)``.
    """
    adapter = trace_adapter(model, image)
    traced = _trace(adapter)
    torch.jit.save(traced, path)
    return traced, output_names(adapter)


def export_onnx(model, image: torch.Tensor, path: str, opset: int = 17, attention: str = "grid_sample"):
    """Export the model to ONNX at ``path`` (TorchScript-based exporter), with the image
    height and width (and the mask size) as dynamic axes.

    Args:
        attention: how the graph expresses the deformable attention (encoder, decoder, mask
            encoder and mask head): "grid_sample" (``GridSample``, opset >= 16), "gather"
            (no ``GridSample``: :func:`soit.layers.ms_deform_attn.ms_deform_attn_pytorch_gather`)
            or "trt_plugin" (TensorRT's plugin node, for TensorRT only:
            :mod:`soit.layers.ms_deform_attn.trt_plugin`).

    Returns the output names.
    """
    if attention not in EXPORT_FORMULATIONS:
        raise ValueError(f"attention must be one of {EXPORT_FORMULATIONS}, got {attention!r}")
    if attention == "grid_sample" and opset < MIN_ONNX_OPSET:
        raise ValueError(f"ONNX opset {opset} has no GridSample; use {MIN_ONNX_OPSET} or newer, or attention='gather'")
    adapter = trace_adapter(model, image)
    with torch.no_grad():
        adapter(*adapter.flattened_inputs)  # fills the output schema
    names = output_names(adapter)
    dynamic_axes = {INPUT_NAME: {1: "height", 2: "width"}, "pred_masks": {1: "height", 2: "width"}}
    with torch.no_grad(), warnings.catch_warnings(), export_formulation(attention):
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            adapter,
            adapter.flattened_inputs,
            path,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_axes={k: v for k, v in dynamic_axes.items() if k == INPUT_NAME or k in names},
            do_constant_folding=True,
        )
    return names


def onnx_op_counts(path: str) -> Dict[str, int]:
    """How many nodes of each operator type the ONNX graph at ``path`` holds (subgraphs
    included), most frequent first."""
    import onnx

    counts: Dict[str, int] = {}

    def visit(graph):
        for node in graph.node:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            counts[key] = counts.get(key, 0) + 1
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    visit(sub)

    visit(onnx.load(path, load_external_data=False).graph)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def run_onnx_with_reference_plugin(path: str, image: np.ndarray, on_plugin=None) -> List[np.ndarray]:
    """The outputs of an ONNX graph exported with ``attention="trt_plugin"``, run by ONNX
    Runtime with each ``MultiscaleDeformableAttnPlugin_TRT`` node computed by our reference
    (:func:`~soit.layers.ms_deform_attn.trt_plugin.plugin_reference`) on the
    node's own inputs, following the plugin's contract. ONNX Runtime cannot run the node, so
    the graph runs in pieces: for each plugin node in order, the subgraph from the image and
    the earlier nodes' outputs to this node's inputs; then the rest. ``on_plugin(node,
    inputs, output)``, if given, sees each node's input and output arrays."""
    import onnx
    import onnxruntime as ort
    from onnx.utils import Extractor

    from .layers.ms_deform_attn.trt_plugin import PLUGIN, plugin_reference

    model = onnx.load(path)
    graph_input = model.graph.input[0].name
    plugins = [n for n in model.graph.node if n.op_type == PLUGIN["op_type"] and n.domain == PLUGIN["domain"]]
    for i, node in enumerate(plugins):  # typed as the contract says, so that shape inference goes past them
        dims = [f"plugin{i}_{d}" for d in "NLMD"]
        model.graph.value_info.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, dims))
    extractor = Extractor(onnx.shape_inference.infer_shapes(model))
    known = {graph_input: image}

    def run(outputs):
        sub = extractor.extract_model(list(known), outputs)
        session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return session.run(outputs, {n: known[n] for n in names})

    for node in plugins:
        inputs = run(list(node.input))
        known[node.output[0]] = plugin_reference(*(torch.from_numpy(a) for a in inputs)).numpy()
        if on_plugin is not None:
            on_plugin(node, inputs, known[node.output[0]])
    return run([o.name for o in model.graph.output])


def instances_from_outputs(outputs: Sequence, names: Sequence[str]) -> Instances:
    """Rebuild ``Instances`` (network input size, mask probabilities) from an exported
    model's outputs: tensors or numpy arrays, in the order of ``names``."""
    if len(outputs) != len(names):
        raise ValueError(f"got {len(outputs)} outputs for {len(names)} names {list(names)}")
    fields: Dict[str, torch.Tensor] = {
        n: torch.from_numpy(np.asarray(o)) if not isinstance(o, torch.Tensor) else o for n, o in zip(names, outputs)
    }
    if "image_size" not in fields:
        raise ValueError(f"the outputs {list(names)} hold no image_size")
    h, w = (int(v) for v in fields.pop("image_size"))
    inst = Instances((h, w))
    for name, value in fields.items():
        inst.set(name, Boxes(value) if name == "pred_boxes" else value)
    return inst


def write_export_info(path: str, model, fmt: str, names: Sequence[str], traced_size, opset=None, attention=None):
    """A JSON file beside the exported model: what goes in, what comes out, how to finish."""
    info = {
        "format": fmt,
        "input": {
            "name": INPUT_NAME,
            "shape": ["3", "height", "width"],
            "channels": model.input_format,
            "dtype": "uint8 or float32, 0-255, already resized (network input)",
        },
        "outputs": list(names),
        "traced_input_size": [int(v) for v in traced_size],
        "mask_threshold": float(model.mask_threshold),
        "postprocess": "soit.modeling.soit_postprocess(instances, height, width, mask_threshold)",
    }
    if opset is not None:
        info["opset"] = opset
    if attention is not None:
        info["attention"] = attention
    if fmt == "torchscript":
        info["load"] = "import soit.export; torch.jit.load(path)  (registers soit::ms_deform_attn)"
    with open(path, "w") as f:
        json.dump(info, f, indent=2)
    return info


def pair_detections(expected: Instances, got: Instances, score_tol: float = 1e-4) -> torch.Tensor:
    """Index in ``got`` of each detection of ``expected``: the same class, a score within
    ``score_tol`` and the nearest box. Detections whose scores differ by less than the
    rounding between two runtimes may swap places in the top-k; this undoes that. A
    detection without a counterpart gets the index of the same rank."""
    order, used = [], set()
    boxes_got = got.pred_boxes.tensor.double().cpu()
    for i in range(len(expected)):
        score, label = expected.scores[i].item(), int(expected.pred_classes[i])
        dist = (boxes_got - expected.pred_boxes.tensor[i].double().cpu()).abs().max(1).values
        best = None
        for j in range(len(got)):
            if j in used or int(got.pred_classes[j]) != label or abs(got.scores[j].item() - score) > score_tol:
                continue
            if best is None or dist[j] < dist[best]:
                best = j
        if best is None:
            best = i
        used.add(best)
        order.append(best)
    return torch.tensor(order, dtype=torch.long)


def max_differences(expected: Instances, got: Instances) -> Dict[str, float]:
    """Largest absolute difference per field between two results in the network input size,
    after pairing their detections (:func:`pair_detections`). Raises when their image sizes
    or detection counts differ."""
    if tuple(int(v) for v in expected.image_size) != tuple(int(v) for v in got.image_size):
        raise AssertionError(f"image sizes differ: {tuple(expected.image_size)} vs {tuple(got.image_size)}")
    if len(expected) != len(got):
        raise AssertionError(f"{len(expected)} detections vs {len(got)}")
    order = pair_detections(expected, got)
    diffs = {}
    for name in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
        a, b = expected.get(name), got.get(name)
        if isinstance(a, Boxes):
            a, b = a.tensor, b.tensor
        b = b.cpu()[order]
        diffs[name] = (a.double().cpu() - b.double()).abs().max().item() if a.numel() else 0.0
    return diffs
