"""SOIT: Segmenting Objects with Instance-aware Transformers, for Detectron2."""

__version__ = "0.1.0"
