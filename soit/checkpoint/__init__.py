"""Conversion of the authors' released checkpoints to this project's model."""

from .convert import AUTHOR, ConversionError, check_against_reference, convert_official_state_dict, official_to_ours
from .official import (
    build_reference_model,
    convert_checkpoint,
    infer_architecture,
    load_official_checkpoint,
    model_config_for,
)

__all__ = [
    "AUTHOR",
    "ConversionError",
    "build_reference_model",
    "check_against_reference",
    "convert_checkpoint",
    "convert_official_state_dict",
    "infer_architecture",
    "load_official_checkpoint",
    "model_config_for",
    "official_to_ours",
]
