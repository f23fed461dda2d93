"""The training step: mixed precision (fp16 or bf16), gradient accumulation, full-model
gradient clipping, and a guard that skips a step whose loss or gradient is not finite."""
import contextlib
import logging
import time

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SOITTrainer", "NonFiniteTrainingError"]

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteTrainingError(FloatingPointError):
    """More consecutive steps with a non-finite loss or gradient than the run allows."""


class SOITTrainer(SimpleTrainer):
    """detectron2's ``SimpleTrainer`` with what SOIT's training needs on top:

    * ``precision``: "fp32", or autocast to "fp16" (with a ``GradScaler``) or "bf16" (no
      scaling needed: bf16 has fp32's exponent range), on whichever device the model is;
    * ``grad_accum_steps``: N micro-batches (each a batch of the loader) per optimizer step,
      their gradients summed with the loss divided by N: one step equals one step on a batch N
      times larger whose losses are means over the batch. An iteration is an optimizer step:
      logging, schedulers and checkpoints count steps;
    * ``clip_grad_norm``: clip the global L2 norm of all gradients (0.1 in the official
      recipe; 0 disables), after unscaling under fp16;
    * ``max_nonfinite_steps``: a step whose loss (any term, any micro-batch, any process) or
      gradient is not finite is skipped: no weight, batch-norm statistics, optimizer-state
      or EMA change; the loss
      terms or parameters concerned and the batch's image files are logged. That many
      skipped steps in a row stop the run (:class:`NonFiniteTrainingError`). Under fp16 the
      ``GradScaler`` skips steps whose scaled gradients overflow on its own; those are
      counted (``amp_skipped_steps`` in the metrics) and logged, not counted as failures.
    """

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        *,
        precision: str = "fp32",
        clip_grad_norm: float = 0.0,
        grad_accum_steps: int = 1,
        max_nonfinite_steps: int = 5,
    ):
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
        for name, value in (("grad_accum_steps", grad_accum_steps), ("max_nonfinite_steps", max_nonfinite_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        super().__init__(model, data_loader, optimizer)
        self.precision = precision
        self.clip_grad_norm = clip_grad_norm
        self.grad_accum_steps = grad_accum_steps
        self.max_nonfinite_steps = max_nonfinite_steps
        self.device = next(model.parameters()).device
        self.device_type = self.device.type
        self.grad_scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None
        self.skipped_steps = 0  # by the guard, over the run
        self.consecutive_skips = 0
        self.amp_skipped_steps = 0  # by the GradScaler
        self.last_step_skipped = False  # read by hooks that must not act on a skipped step (EMA)
        # the only buffers a training forward changes (FrozenBN and other buffers stay put)
        self._statistics = [
            b for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None
        ]  # fmt: skip

    def run_step(self):
        assert self.model.training, "[SOITTrainer] model was changed to eval mode!"
        self.optimizer.zero_grad(set_to_none=True)
        dtype = _DTYPES[self.precision]
        data_time, images, totals, problem = 0.0, [], {}, None
        # the forward updates the batch norms' statistics: restored if the step is skipped
        statistics = [(b, b.detach().clone()) for b in self._statistics]
        for i in range(self.grad_accum_steps):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            images += [str(d.get("file_name", "(no file name)")) for d in data if isinstance(d, dict)]
            with self._no_sync(last=i == self.grad_accum_steps - 1):
                try:
                    with torch.autocast(self.device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
                        loss_dict = self.model(data)
                    bad = [k for k, v in loss_dict.items() if not torch.isfinite(v).all()]
                except FloatingPointError as e:  # the matcher met non-finite predictions
                    loss_dict, bad = {}, [f"the predictions ({e})"]
                if _on_any_process(bool(bad), self.device):
                    problem = f"non-finite loss: {', '.join(bad) if bad else 'in another process'}"
                    break
                loss = sum(loss_dict.values()) / self.grad_accum_steps
                (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()
            for k, v in loss_dict.items():
                totals[k] = totals.get(k, 0.0) + v.detach() / self.grad_accum_steps
        if problem is None:
            problem = self._optimizer_step()
        if problem is not None:
            with torch.no_grad():
                for b, saved in statistics:
                    b.copy_(saved)
            self._skip(problem, images)
            return
        self.consecutive_skips = 0
        self._write_metrics(totals, data_time)

    def _no_sync(self, last):
        """DDP's ``no_sync`` for every micro-batch but the last: gradients are all-reduced once."""
        no_sync = getattr(self.model, "no_sync", None)
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    def _optimizer_step(self):
        """Unscale, clip and step; a description of the problem instead when the gradient is
        not finite (fp32 / bf16: the step is the guard's to skip)."""
        self.last_step_skipped = False
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
            self._clip()
            scale = self.grad_scaler.get_scale()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
            if self.grad_scaler.get_scale() < scale:  # it found inf / NaN gradients and skipped
                self.amp_skipped_steps += 1
                self.last_step_skipped = True
                logger.warning(
                    f"iteration {self.iter}: fp16 gradients overflowed; the GradScaler skipped the step "
                    f"and lowered its scale to {self.grad_scaler.get_scale():g} ({self.amp_skipped_steps} so far)"
                )
            self.storage.put_scalar("amp_skipped_steps", self.amp_skipped_steps, smoothing_hint=False)
            return None
        norm = self._clip()
        if not torch.isfinite(norm):
            params = [n for n, p in self.model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            shown = ", ".join(params[:5]) + (f" and {len(params) - 5} more" if len(params) > 5 else "")
            return f"non-finite gradient (norm {float(norm)}) in {shown}"
        self.optimizer.step()
        return None

    def _clip(self):
        """The gradients' global L2 norm, after clipping them to ``clip_grad_norm`` if set."""
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return torch.zeros(())
        if self.clip_grad_norm <= 0:
            return torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        self.storage.put_scalar("grad_norm", float(norm), smoothing_hint=True)
        return norm

    def _skip(self, problem, images):
        self.optimizer.zero_grad(set_to_none=True)  # nothing of this step reaches the weights
        self.skipped_steps += 1
        self.consecutive_skips += 1
        self.last_step_skipped = True
        self.storage.put_scalar("skipped_steps", self.skipped_steps, smoothing_hint=False)
        message = (
            f"iteration {self.iter}: step skipped, {problem}; images: {', '.join(images) or '(none named)'}; "
            f"{self.consecutive_skips} in a row (the run stops at {self.max_nonfinite_steps})"
        )
        logger.warning(message)
        if self.consecutive_skips >= self.max_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"training stopped: {self.consecutive_skips} steps in a row had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={self.max_nonfinite_steps}); the last one: {message}. The weights "
                "are those of the last finite step; lower the learning rate, check the data named above, or "
                "train in fp32 or with model.attention_fp32=True"
            )

    def state_dict(self):
        ret = super().state_dict()
        ret["skipped_steps"] = self.skipped_steps
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


def _on_any_process(flag: bool, device) -> bool:
    """``flag`` or-ed over the processes of a distributed run (all must skip the same step)."""
    if comm.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())
