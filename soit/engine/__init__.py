from .hooks import ModelEMA, RNGState
from .launch import launch
from .predictor import Predictor
from .trainer import SOITTrainer

__all__ = ["SOITTrainer", "ModelEMA", "RNGState", "launch", "Predictor"]
