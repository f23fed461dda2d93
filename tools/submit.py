#!/usr/bin/env python
"""Train on a SLURM cluster: ``train_net.py``'s training submitted as one job (submitit), which
requeues itself before its time limit or on preemption and resumes exactly.

    python tools/submit.py --config-file configs/soit_r50_50ep.py --nodes 2 --gpus-per-node 8 \\
        --partition gpu --time 4320
    python tools/submit.py --config-file configs/soit_r50_50ep.py --nodes 2 --gpus-per-node 8 \\
        --partition gpu --dry-run                  # print the sbatch script, submit nothing
    python tools/submit.py --cluster local --gpus-per-node 2 --config-file ...   # this machine

Everything after the cluster options is ``train_net.py``'s: ``--config-file``, ``--resume``,
``--eval-only``, ``--trust-config``, ``--register-coco``, and ``key=value`` overrides last.
One process per GPU (``--gpus-per-node``), ``--nodes`` nodes; torch.distributed is set up from
SLURM's variables. The scheduler sends SIGUSR2 ``--signal-delay`` seconds before the time limit
(and on preemption): the job saves a checkpoint after the step it is in, requeues itself (at
most ``--max-requeues`` times) and continues from that checkpoint, as ``--resume`` does. The
job's files (submission pickle, one log per task) are under ``--job-dir``, by default
``<train.output_dir>/submitit/<job id>``.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone

from soit.engine.cluster_submit import ClusterSpec, check_before_submitting, sbatch_script, submit  # noqa: E402
from soit.engine.training import argument_parser  # noqa: E402


def parser():
    p = argument_parser()
    p.description = __doc__.split("\n\n")[0]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n\n", 1)[1]
    c = p.add_argument_group("cluster")
    c.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                   help="SLURM, or submitit's local executor (processes of this machine, same job)")
    c.add_argument("--nodes", type=int, default=1)
    c.add_argument("--gpus-per-node", type=int, default=8, help="processes per node, one per GPU")
    c.add_argument("--cpus-per-task", type=int, default=10, help="CPUs per process (data-loader workers + 2)")
    c.add_argument("--mem-gb", type=int, default=None, help="memory per node")
    c.add_argument("--time", type=int, default=4320, help="time limit of one job, in minutes")
    c.add_argument("--partition", default=None)
    c.add_argument("--account", default=None)
    c.add_argument("--qos", default=None)
    c.add_argument("--constraint", default=None)
    c.add_argument("--exclude", default=None, help="nodes not to use")
    c.add_argument("--comment", default=None)
    c.add_argument("--job-name", default="soit")
    c.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which the job checkpoints and requeues")
    c.add_argument("--max-requeues", type=int, default=20, help="requeues after which the job stops (saved)")
    c.add_argument("--job-dir", default=None, help="submitit's files (default <train.output_dir>/submitit)")
    c.add_argument("--dry-run", action="store_true", help="check and print the sbatch script; submit nothing")
    return p


def spec_from(args):
    try:
        return ClusterSpec(
            nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
            mem_gb=args.mem_gb, time_min=args.time, partition=args.partition, account=args.account,
            qos=args.qos, constraint=args.constraint, exclude=args.exclude, comment=args.comment,
            job_name=args.job_name, signal_delay_s=args.signal_delay, max_requeues=args.max_requeues,
        )  # fmt: skip
    except ValueError as e:
        raise SystemExit(f"submit: {e}") from e


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    spec = spec_from(args)
    if args.dry_run:
        cfg = check_before_submitting(args, spec)
        folder = os.path.join(args.job_dir or os.path.join(cfg.train.output_dir, "submitit"), "%j")
        print(sbatch_script(spec, folder) if args.cluster == "slurm" else f"local executor, {spec.gpus_per_node} processes")
        return None
    try:
        job = submit(args, spec, cluster=args.cluster, folder=args.job_dir)
    except (RuntimeError, ValueError) as e:  # no srun on this machine; a spec the executor cannot run
        raise SystemExit(f"submit: {e}") from e
    print(f"submitted job {job.job_id}; logs: {job.paths.stdout} (one per task)")
    if args.cluster == "local":  # its processes run here: wait for them
        print(f"finished: {job.results()[0]}")
    return job


if __name__ == "__main__":
    main()
