"""Stopping a training run at a step boundary when the cluster asks: the signal a scheduler
sends before a time limit or a preemption only sets a flag; after the step in which any
rank saw it, every rank agrees, the checkpoint is written, and the run stops so that
``--resume`` continues it exactly."""
import logging
import signal

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["StopRequest", "TrainingStopped", "CheckpointAndStop"]

logger = logging.getLogger(__name__)


class TrainingStopped(BaseException):
    """The run stopped on request after ``iteration`` (its checkpoint is saved). A
    ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` on the way
    reports it as a failure."""

    def __init__(self, iteration, checkpoint):
        super().__init__(f"training stopped on request after iteration {iteration}; checkpoint {checkpoint}")
        self.iteration = iteration
        self.checkpoint = checkpoint


class StopRequest:
    """A flag set by a signal handler (:meth:`install`) or by :meth:`request`; read between
    training steps, never acted on inside a signal handler."""

    def __init__(self):
        self.reason = None

    def install(self, signum):
        """Route ``signum`` to this request (the main thread only, as Python requires);
        returns the handler it replaced."""
        return signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        self.request(f"signal {signal.Signals(signum).name}")

    def request(self, reason):
        if self.reason is None:
            # the handler may run inside logging itself: no logging here, CheckpointAndStop logs it
            self.reason = reason

    def agreed(self):
        """Whether any rank has a request (a collective: every rank must call it)."""
        local = self.reason is not None
        if comm.get_world_size() == 1:
            return local
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([int(local)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class CheckpointAndStop(HookBase):
    """Placed after the checkpointers' hooks and before the writers': after a step in which a
    stop was requested (on any rank), gather the random states, save ``model_<iteration>``
    as the periodic checkpointer names it (``last_checkpoint`` then points at it), wait for
    every rank, and raise :class:`TrainingStopped`. A request during the last step lets the
    run finish instead."""

    def __init__(self, request, checkpointer, rng=None, file_prefix="model"):
        self.request = request
        self.checkpointer = checkpointer
        self.rng = rng
        self.file_prefix = file_prefix

    def after_step(self):
        if not self.request.agreed():
            return
        iteration = self.trainer.iter
        if iteration + 1 >= self.trainer.max_iter:
            logger.info(f"stop requested ({self.request.reason or 'by another rank'}) during the last step: finishing")
            return
        if self.rng is not None:
            self.rng.gather()
        name = f"{self.file_prefix}_{iteration:07d}"
        self.checkpointer.save(name, iteration=iteration)  # only the main process writes
        comm.synchronize()
        logger.info(f"stop requested ({self.request.reason or 'by another rank'}): saved {name}.pth, stopping")
        raise TrainingStopped(iteration, name + ".pth")
