"""The training step: optional mixed precision (fp16 or bf16) and full-model gradient clipping."""
import time

import torch
from detectron2.engine import SimpleTrainer

__all__ = ["SOITTrainer"]

_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class SOITTrainer(SimpleTrainer):
    """detectron2's ``SimpleTrainer`` with the two things SOIT's recipe needs on top:

    * ``precision``: "fp32", or autocast to "fp16" (with a ``GradScaler``) or "bf16" (no
      scaling needed: bf16 has fp32's exponent range), on whichever device the model is;
    * ``clip_grad_norm``: clip the global L2 norm of all gradients (0.1 in the official
      recipe; 0 disables), after unscaling under fp16.
    """

    def __init__(self, model, data_loader, optimizer, *, precision: str = "fp32", clip_grad_norm: float = 0.0):
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
        super().__init__(model, data_loader, optimizer)
        self.precision = precision
        self.clip_grad_norm = clip_grad_norm
        device = next(model.parameters()).device.type
        self.device_type = device
        self.grad_scaler = torch.amp.GradScaler(device) if precision == "fp16" else None

    def run_step(self):
        assert self.model.training, "[SOITTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        dtype = _DTYPES[self.precision]
        with torch.autocast(self.device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss_dict = self.model(data)
        losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
            self.grad_scaler.unscale_(self.optimizer)
            self._clip()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            losses.backward()
            self._clip()
            self.optimizer.step()
        self._write_metrics(loss_dict, data_time)

    def _clip(self):
        if self.clip_grad_norm > 0:
            params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
            self.storage.put_scalar("grad_norm", float(norm), smoothing_hint=True)

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
