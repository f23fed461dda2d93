"""Training hooks and checkpointables: model EMA, and random-number states for exact resumes."""
import copy
import random

import numpy as np
import torch
from detectron2.engine import HookBase

__all__ = ["ModelEMA", "RNGState"]


class RNGState:
    """Checkpointable random states (Python, NumPy, PyTorch CPU and CUDA) of this process.

    Saved with the checkpoint so that a resumed run draws the same dropout masks and
    (with ``num_workers=0``) the same augmentations as an uninterrupted one. Stored as
    tensors and plain Python values only, so ``torch.load(weights_only=True)`` reads it.
    """

    def state_dict(self):
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state):
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


class ModelEMA(HookBase):
    """Exponential moving average of the model's weights (off by default in our configs).

    ``ema = decay * ema + (1 - decay) * weights`` after every step (buffers are copied).
    The EMA is a checkpointable (``state_dict``/``load_state_dict``); ``apply_to(model)``
    context-swaps it in, e.g. for evaluation.
    """

    def __init__(self, model, decay: float = 0.9998):
        model = getattr(model, "module", model)  # unwrap DDP
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)
        self._model = model

    @torch.no_grad()
    def after_step(self):
        if getattr(self.trainer, "last_step_skipped", False):  # the weights did not change
            return
        for ema, cur in zip(self.shadow.state_dict().values(), self._model.state_dict().values()):
            if ema.dtype.is_floating_point:
                ema.mul_(self.decay).add_(cur.detach(), alpha=1 - self.decay)
            else:
                ema.copy_(cur)

    def state_dict(self):
        return self.shadow.state_dict()

    def load_state_dict(self, state):
        self.shadow.load_state_dict(state)
