"""The official checkpoint as a whole: what architecture its tensors determine, the model
config that builds that architecture, reading the file safely and writing the converted
checkpoint (the renaming itself is in ``convert.py``)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from .convert import AUTHOR, ConversionError, check_against_reference, convert_official_state_dict

__all__ = ["infer_architecture", "model_config_for", "build_reference_model", "load_official_checkpoint", "convert_checkpoint"]


# ----------------------------------------------------------------------------- architecture
def _count(prefix_re: str, keys) -> int:
    idx = {int(m.group(1)) for k in keys for m in [re.match(prefix_re, k)] if m}
    if idx and idx != set(range(len(idx))):
        raise ConversionError(f"non-contiguous indices for {prefix_re}: {sorted(idx)}")
    return len(idx)


_DEPTHS = {
    (2, 2, 2, 2, False): 18,
    (3, 4, 6, 3, False): 34,
    (3, 4, 6, 3, True): 50,
    (3, 4, 23, 3, True): 101,
    (3, 8, 36, 3, True): 152,
}


def infer_architecture(official: Mapping[str, torch.Tensor]) -> dict:
    """The hyper-parameters that an official state dict determines: ResNet depth, backbone
    stages used by the neck, layer counts, widths, classes, queries (only stored without
    two-stage), mask channels and dynamic parameters."""
    keys = list(official)
    sd = official

    def shape(k):
        if k not in sd:
            raise ConversionError(f"the official checkpoint lacks {k}")
        return tuple(sd[k].shape)

    blocks = tuple(_count(rf"backbone\.layer{s}\.(\d+)\.", keys) for s in range(1, 5))
    bottleneck = "backbone.layer1.0.conv3.weight" in sd
    depth = _DEPTHS.get(blocks + (bottleneck,))
    if depth is None:
        raise ConversionError(f"unsupported ResNet: blocks per stage {blocks}, bottleneck={bottleneck}")
    last_conv = "conv3" if bottleneck else "conv2"
    stage_channels = {f"res{s + 1}": shape(f"backbone.layer{s}.0.{last_conv}.weight")[0] for s in range(1, 5)}
    num_in = _count(r"neck\.convs\.(\d+)\.", keys)
    neck_in = [shape(f"neck.convs.{i}.conv.weight")[1] for i in range(num_in)]
    # the neck takes the last len(neck_in) stages
    stages = [f"res{s}" for s in range(6 - num_in, 6)]
    if [stage_channels[s] for s in stages] != neck_in:
        raise ConversionError(f"neck inputs {neck_in} do not match the backbone stages {stage_channels}")
    tp = "bbox_head.transformer."
    embed_dim, num_levels = shape(tp + "level_embeds")[1], shape(tp + "level_embeds")[0]
    num_dec = _count(rf"{re.escape(tp)}decoder\.layers\.(\d+)\.", keys)
    num_cls = _count(r"bbox_head\.cls_branches\.(\d+)\.", keys)
    two_stage = tp + "enc_output.weight" in sd
    arch = {
        "depth": depth,
        "blocks": blocks,
        "out_features": stages,
        "neck_in_channels": neck_in,
        "num_extra_levels": _count(r"neck\.extra_convs\.(\d+)\.", keys),
        "embed_dim": embed_dim,
        "num_levels": num_levels,
        "num_encoder_layers": _count(rf"{re.escape(tp)}encoder\.layers\.(\d+)\.", keys),
        "num_decoder_layers": num_dec,
        "ffn_dim": shape(tp + "decoder.layers.0.ffns.0.layers.0.0.weight")[0] if num_dec else None,
        "num_classes": shape("bbox_head.cls_branches.0.weight")[0],
        "num_branches": num_cls,
        "two_stage": two_stage,
        "num_queries": shape("bbox_head.query_embedding.weight")[0] if not two_stage else None,
        "mask_encoder_layers": _count(rf"{re.escape(tp)}seg_encoder\.layers\.(\d+)\.", keys),
        "mask_channels": shape(tp + "mask_trans.weight")[0],
        "num_dynamic_params": shape("bbox_head.seg_branches.0.4.weight")[0],
        "mask_branch_copies": _count(r"bbox_head\.seg_branches\.(\d+)\.", keys),
    }
    if num_cls != num_dec + (1 if two_stage else 0):
        raise ConversionError(f"{num_cls} class branches for {num_dec} decoder layers (two_stage={two_stage})")
    return arch


def _default_config_file():
    from ..model_zoo import get_config_file

    return get_config_file("models/soit_r50.py")


def model_config_for(arch: dict, config_file=None, trust_config: bool = False):
    """The LazyConfig model of ``config_file`` (default: configs/models/soit_r50.py; or a
    config's ``model`` already loaded, copied) with the values that
    :func:`infer_architecture` found. A YAML ``config_file`` is read safely unless
    ``trust_config`` (see :func:`soit.config.load_config`)."""
    import copy

    from omegaconf import DictConfig

    from ..config import load_config

    if isinstance(config_file, DictConfig):
        cfg = copy.deepcopy(config_file)
    else:
        cfg = load_config(config_file or _default_config_file(), trust_config=trust_config).model
    cfg.backbone.stages.depth = arch["depth"]
    if arch["depth"] < 50:
        cfg.backbone.stages.pop("stride_in_1x1", None)  # BasicBlock has a single stride
    cfg.backbone.out_features = list(arch["out_features"])
    cfg.in_features = list(arch["out_features"])
    cfg.neck.in_channels = list(arch["neck_in_channels"])
    cfg.neck.num_extra_levels = arch["num_extra_levels"]
    cfg.embed_dim = arch["embed_dim"]
    cfg.neck.out_channels = arch["embed_dim"]
    cfg.transformer.embed_dim = arch["embed_dim"]
    cfg.transformer.num_levels = arch["num_levels"]
    cfg.transformer.num_encoder_layers = arch["num_encoder_layers"]
    cfg.transformer.num_decoder_layers = arch["num_decoder_layers"]
    if arch["ffn_dim"]:
        cfg.transformer.ffn_dim = arch["ffn_dim"]
        cfg.mask_encoder.ffn_dim = arch["ffn_dim"]
    cfg.two_stage = arch["two_stage"]
    if arch["num_queries"]:
        cfg.transformer.num_queries = arch["num_queries"]
    cfg.num_classes = arch["num_classes"]
    cfg.mask_encoder.embed_dim = arch["embed_dim"]
    cfg.mask_encoder.num_layers = arch["mask_encoder_layers"]
    cfg.mask_head.mask_channels = arch["mask_channels"]
    return cfg


def build_reference_model(arch: dict, config_file=None, trust_config: bool = False):
    """Our model for the architecture of an official checkpoint (for shape checks)."""
    from detectron2.config import instantiate

    return instantiate(model_config_for(arch, config_file, trust_config))


# ----------------------------------------------------------------------------- files
def load_official_checkpoint(path: str, trust_pickle: bool = False):
    """(state_dict, meta) of an official checkpoint file: a dict with "state_dict" (and
    usually "meta"), or a bare state dict. Loaded with ``weights_only=True`` unless
    ``trust_pickle`` (full unpickling, which can run arbitrary code: trusted files only)."""
    from .safe_load import UnsafeFileError, torch_load_checked

    try:
        data = torch_load_checked(path, trust_pickle)
    except (UnsafeFileError, ValueError, FileNotFoundError) as e:  # names the file; real pickles also the opt-in
        raise ConversionError(str(e)) from e
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a dict, got {type(data).__name__}")
    if "state_dict" in data:
        return data["state_dict"], data.get("meta")
    if "model" in data and isinstance(data["model"], dict):
        raise ConversionError(f"{path} has a 'model' entry: it looks like a detectron2 checkpoint already")
    return data, None


def convert_checkpoint(
    in_path: str,
    out_path: str,
    overwrite: bool = False,
    model=None,
    config_file: str | None = None,
    trust_pickle: bool = False,
    trust_config: bool = False,
) -> dict:
    """Convert an official checkpoint file to one that ``DetectionCheckpointer(model).load``
    loads with no missing or unexpected keys.

    Args:
        in_path: the official checkpoint.
        out_path: where to write ``{"model": state_dict, "__author__": ..., "matching_heuristics": False}``.
        overwrite: replace an existing ``out_path``.
        model: our model to check names and shapes against; by default one is built from
            ``config_file`` (configs/models/soit_r50.py) with the checkpoint's architecture.
        trust_pickle: read ``in_path`` with full unpickling (trusted files only).
        trust_config: read a YAML ``config_file`` without the safe loader's limits.

    Returns:
        A summary: "num_tensors", "num_parameters" (elements), "dropped", "mask_branch_copies",
        "architecture", "out_path".
    """
    if os.path.exists(out_path) and not overwrite:
        raise FileExistsError(f"{out_path} exists (pass overwrite=True / --overwrite to replace it)")
    base = None
    if model is None:  # a config that cannot be read is reported before the checkpoint is read
        from ..config import load_config

        base = load_config(config_file or _default_config_file(), trust_config=trust_config).model
    official, meta = load_official_checkpoint(in_path, trust_pickle=trust_pickle)
    arch = infer_architecture(official)
    if model is None:
        model = build_reference_model(arch, base)
    stats: dict = {}
    state = convert_official_state_dict(official, reference=model.state_dict(), stats=stats)
    out = {"model": state, "__author__": AUTHOR, "matching_heuristics": False}
    if isinstance(meta, dict):
        out["official_meta"] = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    tmp = out_path + ".tmp"
    torch.save(out, tmp)
    os.replace(tmp, out_path)
    return {
        "num_tensors": len(state),
        "num_parameters": sum(v.numel() for v in state.values()),
        "dropped": stats["dropped"],
        "mask_branch_copies": stats["mask_branch_copies"],
        "architecture": arch,
        "out_path": out_path,
    }
