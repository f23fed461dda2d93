"""Training hooks and checkpointables: model EMA, and every process's random-number states for exact resumes."""
import copy
import logging
import random

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["ModelEMA", "RNGState", "GatherRNGStates"]

logger = logging.getLogger(__name__)


class RNGState:
    """Checkpointable random states (Python, NumPy, PyTorch CPU and CUDA) of every process.

    Saved with the checkpoint so that a resumed run draws the same dropout masks and
    (with ``num_workers=0``) the same augmentations as an uninterrupted one. Stored as
    tensors and plain Python values only, so ``torch.load(weights_only=True)`` reads it.

    In a run of several processes only the main one writes checkpoints: :meth:`gather`, a
    collective every rank calls before a save (:class:`GatherRNGStates`), brings each
    rank's states to it, and on loading each rank restores its own. A checkpoint written
    by a different number of processes leaves the states as seeded, with a warning.
    """

    def __init__(self):
        self._ranks = None  # every rank's states, from the last gather()

    @staticmethod
    def local_state():
        """This process's states."""
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

    def gather(self):
        """Collect every rank's states (a collective: every rank must call it)."""
        self._ranks = comm.all_gather(self.local_state()) if comm.get_world_size() > 1 else None

    def state_dict(self):
        if comm.get_world_size() == 1:
            return self.local_state()
        if self._ranks is None:
            raise RuntimeError("RNGState.gather() must run on every rank before a checkpoint of several processes")
        return {"ranks": self._ranks}

    def load_state_dict(self, state):
        world, rank = comm.get_world_size(), comm.get_rank()
        saved = len(state["ranks"]) if "ranks" in state else 1
        if saved != world:
            logger.warning(
                f"the checkpoint holds the random states of {saved} process(es), this run has {world}: "
                "random states continue from the seed, so augmentations differ from an uninterrupted run"
            )
            return
        self._restore(state["ranks"][rank] if "ranks" in state else state)

    @staticmethod
    def _restore(state):
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


class GatherRNGStates(HookBase):
    """Gathers :class:`RNGState` on every rank after each step whose end a checkpointer may
    save (``period``, ``eval_period`` multiples and the last step); placed after evaluation
    and before the checkpointers, so the states saved are those the next step starts from."""

    def __init__(self, rng, periods):
        self.rng = rng
        self.periods = [p for p in periods if p and p > 0]

    def after_step(self):
        step = self.trainer.iter + 1
        if step >= self.trainer.max_iter or any(step % p == 0 for p in self.periods):
            self.rng.gather()


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
