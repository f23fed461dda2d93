"""``launch`` that also runs several processes on the CPU (gloo), for debugging and tests.

detectron2 v0.6's ``launch`` requires CUDA and NCCL for more than one process. With CUDA
available this simply calls it; without, it spawns the processes itself with the gloo
backend and sets up detectron2's local process group the same way.
"""
import logging
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

__all__ = ["launch", "init_distributed"]

DEFAULT_TIMEOUT = timedelta(minutes=30)


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None, args=(), timeout=DEFAULT_TIMEOUT):
    """Run ``main_func(*args)`` in ``num_gpus_per_machine * num_machines`` processes.

    ``num_gpus_per_machine`` counts processes per machine: GPUs when CUDA is available,
    CPU processes otherwise.
    """
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1 or torch.cuda.is_available():
        return d2_launch(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, timeout)
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' is only for a single machine; pass tcp://HOST:PORT")
        port = _free_port()
        dist_url = f"tcp://127.0.0.1:{port}"
    mp.start_processes(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
    )


def _free_port():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_worker(local_rank, main_func, world_size, procs_per_machine, machine_rank, dist_url, args, timeout):
    init_distributed(
        "gloo", dist_url, world_size, machine_rank * procs_per_machine + local_rank, procs_per_machine, timeout
    )
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def init_distributed(backend, dist_url, world_size, rank, procs_per_machine, timeout=DEFAULT_TIMEOUT):
    """The process group, and detectron2's group of the ranks on this machine (ranks are
    numbered machine by machine, ``procs_per_machine`` on each), as detectron2's ``launch``
    sets them up; returns when every rank has joined."""
    try:
        dist.init_process_group(backend, init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout)
    except Exception:
        logging.getLogger(__name__).error(f"Process group URL: {dist_url}")
        raise
    machine = rank // procs_per_machine
    for i in range(world_size // procs_per_machine):
        group = dist.new_group(list(range(i * procs_per_machine, (i + 1) * procs_per_machine)))
        if i == machine:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
