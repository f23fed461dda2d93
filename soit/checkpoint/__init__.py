"""Conversion of the authors' released checkpoints to this project's model."""

from .convert import (
    AUTHOR,
    ConversionError,
    build_reference_model,
    check_against_reference,
    convert_checkpoint,
    convert_official_state_dict,
    infer_architecture,
    load_official_checkpoint,
    model_config_for,
    official_to_ours,
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
