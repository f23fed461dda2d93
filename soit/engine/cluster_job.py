"""What a cluster job runs on each of its tasks (``tools/submit.py`` submits it with submitit):
torch.distributed set up from the scheduler's variables, then ``train_net.py``'s
:func:`~soit.engine.training.main`; on the signal a scheduler sends before a time limit or a
preemption, a checkpoint at the next step boundary, a requeue, and an exact resume.

The requeue, step by step: the signal only sets a :class:`~soit.engine.preemption.StopRequest`;
after the step in which any rank saw it, every rank agrees, the main process saves
``model_<iteration>.pth`` (weights, optimizer, scheduler, every rank's random states), and the
run stops. The main process then rewrites the job's submitit pickle with this job counted once
more and ``--resume`` set, and asks the scheduler to requeue it (SLURM: ``scontrol requeue``;
submitit's local executor: the exit code it restarts tasks on). The requeued job resumes from
that checkpoint as ``train_net.py --resume`` does. A signal that arrives before training has
started (or after it ended) goes to submitit's own handler, which calls :meth:`TrainingJob.checkpoint`:
the job is requeued and resumes from the last checkpoint written.
"""
import copy
import hashlib
import logging
import os
import signal
import subprocess
import sys
import zlib

import torch

from .preemption import StopRequest, TrainingStopped

__all__ = ["TrainingJob", "REQUEUE_EXIT_CODE", "preemption_signal", "process_group", "file_digest"]

logger = logging.getLogger("soit")

# submitit's local executor restarts a job's tasks when one exits with this code
# (submitit.local.local.LOCAL_REQUEUE_RETURN_CODE); under SLURM any exit after the requeue will do
REQUEUE_EXIT_CODE = 144


def preemption_signal():
    """The signal submitit asks the scheduler to send before a time limit (``USR2`` unless
    the ``SUBMITIT_PREEMPT_SIGNAL`` environment variable names another)."""
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    if not hasattr(signal, name):
        raise ValueError(f"SUBMITIT_PREEMPT_SIGNAL names {name}, which is not a signal of this system")
    return getattr(signal, name)


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def process_group(env, port=None):
    """The process group a job's task joins, from its submitit ``JobEnvironment`` (SLURM's
    variables under SLURM): ``url`` (rendezvous on the job's first node; ``port`` by default
    derived from the job id, so the same on every task and after a requeue), ``world_size``,
    ``rank``, ``local_rank`` and ``per_node``; None for a job of one task."""
    world, nodes = env.num_tasks, env.num_nodes
    if world == 1:
        return None
    if world % nodes:
        raise RuntimeError(f"{world} tasks cannot be spread evenly over {nodes} nodes")
    host = env.hostnames[0] if nodes > 1 else "127.0.0.1"
    port = port or 20000 + zlib.crc32(str(env.job_id).encode()) % 20000
    return {"url": f"tcp://{host}:{port}", "world_size": world, "rank": env.global_rank,
            "local_rank": env.local_rank, "per_node": world // nodes}  # fmt: skip


class TrainingJob:
    """The callable submitit pickles and runs on every task of the job.

    Args:
        args: ``train_net.py``'s arguments (:func:`soit.engine.training.argument_parser`).
        max_requeues: how many times the job may requeue itself; the stop after that is
            saved and ends the job with an error that says how to continue.
        requeues: how many times this job has been requeued already.
        config_digest: SHA-256 of the config file at submission; a requeued job whose file
            changed since says so in its log (it trains with the new one).
        dist_port: the TCP port of the process group's rendezvous on the first node
            (default: derived from the job id).
    """

    def __init__(self, args, *, max_requeues=20, requeues=0, config_digest=None, dist_port=None):
        if max_requeues < 0:
            raise ValueError(f"max_requeues must be >= 0, got {max_requeues}")
        self.args = args
        self.max_requeues = max_requeues
        self.requeues = requeues
        self.config_digest = config_digest
        self.dist_port = dist_port

    def __call__(self):
        import submitit

        from .training import main

        env = submitit.JobEnvironment()
        request = StopRequest()
        request.install(preemption_signal())
        args = copy.copy(self.args)
        if self.requeues:
            args.resume = True
        self._init_distributed(env)
        try:
            if self.requeues:
                self._check_config()
            try:
                result = main(args, stop_request=request)
            except TrainingStopped as stop:
                self._stop_and_requeue(env, stop)  # does not return
            return self._summary(result)
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    def checkpoint(self):
        """submitit's hook, for a signal outside the training loop: requeue, resuming from the
        last checkpoint written."""
        import submitit

        return submitit.helpers.DelayedSubmission(self.requeued())

    def requeued(self):
        """This job as its next requeue runs it."""
        return type(self)(
            self.args,
            max_requeues=self.max_requeues,
            requeues=self.requeues + 1,
            config_digest=self.config_digest,
            dist_port=self.dist_port,
        )

    def _summary(self, result):
        if self.args.eval_only:
            return result
        return {"iteration": result.iter, "output_dir": result.checkpointer.save_dir, "requeues": self.requeues}

    def _check_config(self):
        path = self.args.config_file
        if self.config_digest and os.path.isfile(path) and file_digest(path) != self.config_digest:
            logger.warning(f"{path} changed since the job was submitted: the resumed run reads it as it is now")

    def _init_distributed(self, env):
        from .launch import init_distributed

        group = process_group(env, self.dist_port)
        if group is None:
            return
        if torch.cuda.is_available():
            torch.cuda.set_device(group["local_rank"])
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        init_distributed(backend, group["url"], group["world_size"], group["rank"], group["per_node"])

    def _stop_and_requeue(self, env, stop):
        from detectron2.utils import comm

        if self.requeues >= self.max_requeues:
            raise RuntimeError(
                f"training stopped after iteration {stop.iteration} and the job has been requeued "
                f"{self.requeues} times, its limit (--max-requeues): not requeued. The run is saved "
                f"({stop.checkpoint}); submit it again with --resume to continue."
            )
        if comm.is_main_process():
            self._write_requeued_submission(env)
            if env.cluster == "slurm":
                subprocess.check_call(["scontrol", "requeue", str(env.job_id)], timeout=60)
            logger.info(f"requeued job {env.job_id} ({self.requeues + 1} of at most {self.max_requeues})")
        comm.synchronize()  # nobody leaves before the requeue is in place
        sys.exit(REQUEUE_EXIT_CODE)

    def _write_requeued_submission(self, env):
        """Replace the function in the job's submitit pickle (kept with everything submitit
        recorded in it) by :meth:`requeued`; written aside and renamed, so a reader never
        sees half a file."""
        import submitit

        path = env.paths.submitted_pickle
        delayed = submitit.helpers.DelayedSubmission.load(path)
        delayed.function = self.requeued()
        tmp = f"{path}.requeue_tmp"
        delayed.dump(tmp)
        os.replace(tmp, path)
