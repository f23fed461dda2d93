"""Submitting ``train_net.py``'s training as a cluster job with submitit: the job's resources
as submitit's SLURM parameters (or its local executor's, which runs the same job as
processes of this machine), the checks worth doing before a job waits in a queue, and the
submission itself. ``tools/submit.py`` is the command line; what runs inside the job is
:mod:`soit.engine.cluster_job`."""
import os
import shlex
import sys

from .cluster_job import TrainingJob, file_digest

__all__ = ["ClusterSpec", "slurm_parameters", "local_parameters", "sbatch_script", "make_executor", "submit"]


class ClusterSpec:
    """What a job asks of the cluster (``tools/submit.py``'s options).

    ``gpus_per_node`` is also the number of processes per node (one per GPU; on a machine
    without CUDA, CPU processes with gloo). ``time_min`` is the job's time limit in minutes;
    the scheduler sends the preemption signal ``signal_delay_s`` seconds before it, which
    must leave time to finish a step and write a checkpoint.
    """

    def __init__(
        self,
        *,
        nodes=1,
        gpus_per_node=8,
        cpus_per_task=None,
        mem_gb=None,
        time_min=4320,
        partition=None,
        account=None,
        qos=None,
        constraint=None,
        exclude=None,
        comment=None,
        job_name="soit",
        signal_delay_s=120,
        max_requeues=20,
    ):
        for name, value, low in (("nodes", nodes, 1), ("gpus_per_node", gpus_per_node, 1), ("time_min", time_min, 1),
                                 ("signal_delay_s", signal_delay_s, 1), ("max_requeues", max_requeues, 0)):  # fmt: skip
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if signal_delay_s >= time_min * 60:
            raise ValueError(f"signal_delay_s={signal_delay_s} leaves no training time in a {time_min}-minute job")
        self.nodes, self.gpus_per_node, self.cpus_per_task, self.mem_gb = nodes, gpus_per_node, cpus_per_task, mem_gb
        self.time_min, self.partition, self.account, self.qos = time_min, partition, account, qos
        self.constraint, self.exclude, self.comment, self.job_name = constraint, exclude, comment, job_name
        self.signal_delay_s, self.max_requeues = signal_delay_s, max_requeues

    @property
    def world_size(self):
        return self.nodes * self.gpus_per_node


def slurm_parameters(spec):
    """``spec`` as ``submitit.SlurmExecutor.update_parameters`` keywords (sbatch's options)."""
    params = {
        "job_name": spec.job_name,
        "nodes": spec.nodes,
        "ntasks_per_node": spec.gpus_per_node,  # one process per GPU
        "gpus_per_node": spec.gpus_per_node,
        "time": spec.time_min,
        "signal_delay_s": spec.signal_delay_s,
        "cpus_per_task": spec.cpus_per_task,
        "mem": None if spec.mem_gb is None else f"{spec.mem_gb}GB",
        "partition": spec.partition,
        "account": spec.account,
        "qos": spec.qos,
        "constraint": spec.constraint,
        "exclude": spec.exclude,
        "comment": spec.comment,
    }
    return {k: v for k, v in params.items() if v is not None}


def local_parameters(spec, cuda=None):
    """``spec`` for ``submitit.LocalExecutor``: one node, ``gpus_per_node`` processes
    (GPUs when CUDA is available, CPU processes with gloo otherwise)."""
    if spec.nodes != 1:
        raise ValueError(f"the local executor runs on this machine only: nodes must be 1, got {spec.nodes}")
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return {
        "tasks_per_node": spec.gpus_per_node,
        "gpus_per_node": spec.gpus_per_node if cuda else 0,
        "timeout_min": spec.time_min,
        "signal_delay_s": spec.signal_delay_s,
    }


def sbatch_script(spec, folder, python=None):
    """The sbatch script submitit writes for ``spec`` (what ``--dry-run`` prints)."""
    from submitit.slurm.slurm import _make_sbatch_string

    python = shlex.quote(python or sys.executable)
    command = f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(spec))


def make_executor(cluster, folder, spec):
    """A submitit executor for ``cluster`` ("slurm" or "local") with ``spec`` applied; job
    files (pickles, logs) go under ``folder/<job id>``."""
    import submitit

    kinds = {"slurm": (submitit.SlurmExecutor, slurm_parameters), "local": (submitit.LocalExecutor, local_parameters)}
    if cluster not in kinds:
        raise ValueError(f"cluster must be 'slurm' or 'local', got {cluster!r}")
    kind, parameters = kinds[cluster]
    parameters = parameters(spec)  # before the executor creates its folder
    executor = kind(os.path.join(folder, "%j"), max_num_timeout=spec.max_requeues)
    executor.update_parameters(**parameters)
    return executor


def check_before_submitting(args, spec):
    """What would fail in the job, said now rather than after a wait in the queue: the config
    loads, the output folder holds no earlier run unless resuming, and the batch splits
    evenly over the processes. Returns the loaded config."""
    from ..config import load_config
    from .training import check_output_dir

    if not os.path.isfile(args.config_file):
        raise SystemExit(f"--config-file {args.config_file}: no such file")
    cfg = load_config(
        args.config_file, args.opts,
        trust_config=getattr(args, "trust_config", False), trust_pickle=getattr(args, "trust_pickle", False),
    )  # fmt: skip
    if not args.eval_only:
        check_output_dir(cfg, args.resume)
        batch = cfg.dataloader.train.total_batch_size
        if batch % spec.world_size:
            raise SystemExit(
                f"dataloader.train.total_batch_size={batch} does not split over {spec.nodes} node(s) x "
                f"{spec.gpus_per_node} GPU(s) = {spec.world_size} processes; choose a multiple of {spec.world_size}"
            )
    return cfg


def submit(args, spec, cluster="slurm", folder=None):
    """Submit ``train_net.py`` with ``args`` as one job of ``spec``; returns the submitit job.
    ``folder``: where submitit keeps the job's files (default ``<train.output_dir>/submitit``)."""
    cfg = check_before_submitting(args, spec)
    folder = folder or os.path.join(cfg.train.output_dir, "submitit")
    args.num_gpus, args.num_machines = spec.gpus_per_node, spec.nodes  # as the job runs it, for its log
    job = TrainingJob(args, max_requeues=spec.max_requeues, config_digest=file_digest(args.config_file))
    return make_executor(cluster, folder, spec).submit(job)
