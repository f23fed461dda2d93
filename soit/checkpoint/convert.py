"""Conversion of the authors' released SOIT checkpoints (mmdet/opera layout) to this
project's state-dict names.

The conversion is a pure renaming, with strict accounting:

* every official tensor is used exactly once; the only tensors dropped are the backbone
  BatchNorm ``num_batches_tracked`` counters (our backbone uses FrozenBN, which has none);
* the official head stores one copy of the shared mask branch per decoder layer
  (``bbox_head.seg_branches.{i}``); the copies must be identical and are stored once as
  ``mask_branch.layers.{0,1,2}``;
* unknown keys, missing tensors, name collisions and (given a reference model) shape
  mismatches raise :class:`ConversionError` naming the keys.

Name mapping (official -> ours):

=============================================================  ==========================================
``backbone.conv1`` / ``backbone.bn1.*``                         ``backbone.stem.conv1`` / ``.conv1.norm.*``
``backbone.layer{k}.{b}.conv{j}`` / ``.bn{j}.*``                ``backbone.res{k+1}.{b}.conv{j}`` / ``.conv{j}.norm.*``
``backbone.layer{k}.{b}.downsample.0`` / ``.downsample.1.*``    ``backbone.res{k+1}.{b}.shortcut`` / ``.shortcut.norm.*``
``neck.*``                                                      ``neck.*`` (same names)
``bbox_head.transformer.encoder.layers.{i}.attentions.0``       ``transformer.encoder.layers.{i}.self_attn``
``bbox_head.transformer.decoder.layers.{i}.attentions.0.attn``  ``transformer.decoder.layers.{i}.self_attn``
``bbox_head.transformer.decoder.layers.{i}.attentions.1``       ``transformer.decoder.layers.{i}.cross_attn``
``... .ffns.0.layers.0.0`` / ``.ffns.0.layers.1``               ``... .ffn.linear1`` / ``.ffn.linear2``
``... .norms.{j}``                                              ``... .norm{j+1}``
``bbox_head.transformer.seg_encoder.layers.{i}``                ``mask_encoder.layers.{i}`` (same inner rules)
``bbox_head.transformer.mask_trans(_norm)``                     ``mask_encoder.proj`` / ``mask_encoder.norm``
``bbox_head.transformer.{level_embeds,enc_output(_norm),...}``  ``transformer.{...}``
``bbox_head.query_embedding``                                   ``transformer.query_embedding``
``bbox_head.cls_branches.{i}``                                  ``cls_branches.{i}``
``bbox_head.reg_branches.{i}.{0,2,4}``                          ``reg_branches.{i}.layers.{0,1,2}``
``bbox_head.seg_branches.{i}.{0,2,4}`` (all i, identical)       ``mask_branch.layers.{0,1,2}``
=============================================================  ==========================================
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping

import torch

__all__ = [
    "AUTHOR",
    "ConversionError",
    "build_reference_model",
    "convert_checkpoint",
    "convert_official_state_dict",
    "infer_architecture",
    "load_official_checkpoint",
    "official_to_ours",
]

AUTHOR = "soit.convert_official"
_BN_FIELDS = r"(weight|bias|running_mean|running_var)"
_MLP_INDEX = {"0": "0", "2": "1", "4": "2"}  # nn.Sequential(Linear, ReLU, Linear, ReLU, Linear)


class ConversionError(ValueError):
    """An official checkpoint that cannot be converted without loss or ambiguity."""


def _fmt_keys(keys, limit=12):
    keys = sorted(keys)
    text = ", ".join(keys[:limit])
    if len(keys) > limit:
        text += f", ... ({len(keys) - limit} more)"
    return text


# Rules for the layers inside the transformer, applied in order to the part of the key
# after "bbox_head.transformer.".
_LAYER_RULES = [
    (re.compile(r"^encoder\.layers\.(\d+)\.attentions\.0\."), r"encoder.layers.\1.self_attn."),
    (re.compile(r"^seg_encoder\.layers\.(\d+)\.attentions\.0\."), r"seg_encoder.layers.\1.self_attn."),
    (re.compile(r"^decoder\.layers\.(\d+)\.attentions\.0\.attn\."), r"decoder.layers.\1.self_attn."),
    (re.compile(r"^decoder\.layers\.(\d+)\.attentions\.1\."), r"decoder.layers.\1.cross_attn."),
    (re.compile(r"\.ffns\.0\.layers\.0\.0\.(weight|bias)$"), r".ffn.linear1.\1"),
    (re.compile(r"\.ffns\.0\.layers\.1\.(weight|bias)$"), r".ffn.linear2.\1"),
    (re.compile(r"\.norms\.(\d)\.(weight|bias)$"), lambda m: f".norm{int(m.group(1)) + 1}.{m.group(2)}"),
]
# Valid results of the rules above (anything else is an unknown key).
_LAYER_OK = re.compile(
    r"^(encoder|decoder|seg_encoder)\.layers\.\d+\."
    r"(self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)"
    r"|self_attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"
    r"|cross_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)"
    r"|ffn\.linear[12]\.(weight|bias)"
    r"|norm[123]\.(weight|bias))$"
)
_TRANSFORMER_TOP = re.compile(
    r"^(level_embeds|(enc_output|enc_output_norm|pos_trans|pos_trans_norm|reference_points)\.(weight|bias))$"
)


def official_to_ours(key: str) -> str | None:
    """Our name of one official tensor; None for the tensors the conversion drops
    (``num_batches_tracked``). Raises :class:`ConversionError` for an unknown key and for
    the shared mask branch ``bbox_head.seg_branches.*``, which only
    :func:`convert_official_state_dict` converts (its copies are merged)."""
    if key.endswith(".num_batches_tracked"):
        return None
    if key.startswith("backbone."):
        k = key[len("backbone.") :]
        if k == "conv1.weight":
            return "backbone.stem.conv1.weight"
        m = re.fullmatch(r"bn1\." + _BN_FIELDS, k)
        if m:
            return f"backbone.stem.conv1.norm.{m.group(1)}"
        m = re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)", k)
        if m:
            prefix = f"backbone.res{int(m.group(1)) + 1}.{m.group(2)}."
            rest = m.group(3)
            if re.fullmatch(r"conv[123]\.weight", rest):
                return prefix + rest
            r = re.fullmatch(r"bn([123])\." + _BN_FIELDS, rest)
            if r:
                return prefix + f"conv{r.group(1)}.norm.{r.group(2)}"
            if rest == "downsample.0.weight":
                return prefix + "shortcut.weight"
            r = re.fullmatch(r"downsample\.1\." + _BN_FIELDS, rest)
            if r:
                return prefix + f"shortcut.norm.{r.group(1)}"
    elif key.startswith("neck."):
        if re.fullmatch(r"neck\.(convs|extra_convs)\.\d+\.(conv\.weight|conv\.bias|gn\.weight|gn\.bias)", key):
            return key
    elif key.startswith("bbox_head.transformer."):
        k = key[len("bbox_head.transformer.") :]
        if _TRANSFORMER_TOP.match(k):
            return "transformer." + k
        m = re.fullmatch(r"mask_trans(_norm)?\.(weight|bias)", k)
        if m:
            return f"mask_encoder.{'norm' if m.group(1) else 'proj'}.{m.group(2)}"
        for pattern, repl in _LAYER_RULES:
            k = pattern.sub(repl, k)
        if _LAYER_OK.match(k):
            if k.startswith("seg_encoder."):
                return "mask_encoder." + k[len("seg_encoder.") :]
            return "transformer." + k
    elif key.startswith("bbox_head."):
        k = key[len("bbox_head.") :]
        if k == "query_embedding.weight":
            return "transformer.query_embedding.weight"
        m = re.fullmatch(r"cls_branches\.(\d+)\.(weight|bias)", k)
        if m:
            return f"cls_branches.{m.group(1)}.{m.group(2)}"
        m = re.fullmatch(r"reg_branches\.(\d+)\.([024])\.(weight|bias)", k)
        if m:
            return f"reg_branches.{m.group(1)}.layers.{_MLP_INDEX[m.group(2)]}.{m.group(3)}"
        if re.fullmatch(r"seg_branches\.\d+\.[024]\.(weight|bias)", k):
            raise ConversionError(f"{key}: the shared mask branch is converted by convert_official_state_dict only")
    raise ConversionError(f"unknown official checkpoint key: {key}")


def _merge_mask_branch(copies: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The per-layer copies of the shared mask branch -> one ``mask_branch.*`` set.
    ``copies``: copy index -> {"{j}.{weight,bias}": tensor}."""
    indices = sorted(copies, key=int)
    first = copies[indices[0]]
    for i in indices[1:]:
        other = copies[i]
        if set(other) != set(first):
            diff = {f"bbox_head.seg_branches.{i}.{s}" for s in set(other) ^ set(first)}
            diff |= {f"bbox_head.seg_branches.{indices[0]}.{s}" for s in set(first) - set(other)}
            raise ConversionError(
                f"the copies of the shared mask branch hold different tensors: {_fmt_keys(diff)} "
                f"(compared with bbox_head.seg_branches.{indices[0]})"
            )
        differing = [
            s for s in sorted(first) if first[s].shape != other[s].shape or not torch.equal(first[s], other[s])
        ]
        if differing:
            names = [f"bbox_head.seg_branches.{i}.{s}" for s in differing]
            raise ConversionError(
                "the mask branch is shared by the decoder layers, but its stored copies differ: "
                f"{_fmt_keys(names)} != bbox_head.seg_branches.{indices[0]}.* "
                "(a checkpoint with per-layer mask branches cannot be converted to this model)"
            )
    out = {}
    for s, t in first.items():
        j, field = s.split(".")
        out[f"mask_branch.layers.{_MLP_INDEX[j]}.{field}"] = t
    return out


def convert_official_state_dict(
    official: Mapping[str, torch.Tensor],
    reference: Mapping[str, object] | None = None,
    stats: dict | None = None,
) -> OrderedDict[str, torch.Tensor]:
    """Rename an official SOIT state dict to this project's names.

    Args:
        official: the authors' state dict (official names -> tensors).
        reference: optional state dict (or name -> shape mapping) of the target model. When
            given, the converted names must equal its names exactly (no missing, no
            unexpected) and every shape must match.
        stats: optional dict, filled with "dropped" (the dropped ``num_batches_tracked``
            keys), "mask_branch_copies" (number of merged mask-branch copies) and "source"
            (our name -> the official key it came from).

    Returns:
        An ordered dict of our names -> the official tensors (unchanged).
    """
    converted: OrderedDict[str, torch.Tensor] = OrderedDict()
    source: dict[str, str] = {}
    dropped, unknown = [], []
    mask_copies: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in official.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{key}: expected a tensor, got {type(value).__name__}")
        m = re.fullmatch(r"bbox_head\.seg_branches\.(\d+)\.([024]\.(?:weight|bias))", key)
        if m:
            mask_copies.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        try:
            ours = official_to_ours(key)
        except ConversionError:
            unknown.append(key)
            continue
        if ours is None:
            dropped.append(key)
            continue
        if ours in converted:
            raise ConversionError(f"{key} and {source[ours]} both map to {ours}")
        converted[ours] = value
        source[ours] = key
    if unknown:
        raise ConversionError(f"unknown official checkpoint keys: {_fmt_keys(unknown)}")
    if mask_copies:
        for ours, value in _merge_mask_branch(mask_copies).items():
            converted[ours] = value
            source[ours] = f"bbox_head.seg_branches.*.{ours.split('.', 2)[2]}"
    if stats is not None:
        stats["dropped"] = dropped
        stats["mask_branch_copies"] = len(mask_copies)
        stats["source"] = source
    if reference is not None:
        check_against_reference(converted, reference, source)
    return converted


def _shape(v) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def check_against_reference(converted: Mapping[str, torch.Tensor], reference: Mapping[str, object], source=None):
    """Raise :class:`ConversionError` unless ``converted`` has exactly the names and shapes
    of ``reference`` (a state dict or a name -> shape mapping)."""
    source = source or {}
    missing = [k for k in reference if k not in converted]
    unexpected = [k for k in converted if k not in reference]
    problems = []
    if missing:
        problems.append(f"missing in the official checkpoint (our names): {_fmt_keys(missing)}")
    if unexpected:
        names = [f"{k} (from {source[k]})" if k in source else k for k in unexpected]
        problems.append(f"not in our model: {_fmt_keys(names)}")
    for k, v in converted.items():
        if k in reference and _shape(v) != _shape(reference[k]):
            problems.append(
                f"shape mismatch for {source.get(k, k)} -> {k}: checkpoint {_shape(v)}, model {_shape(reference[k])}"
            )
    if problems:
        raise ConversionError("the official checkpoint does not fit the model:\n  " + "\n  ".join(problems))


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
