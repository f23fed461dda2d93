from .hooks import ModelEMA, RNGState
from .launch import launch
from .trainer import SOITTrainer

__all__ = ["SOITTrainer", "ModelEMA", "RNGState", "launch"]
