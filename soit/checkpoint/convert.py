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

import re
from collections import OrderedDict
from collections.abc import Mapping

import torch

__all__ = ["AUTHOR", "ConversionError", "check_against_reference", "convert_official_state_dict", "official_to_ours"]

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
