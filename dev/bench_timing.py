"""Wall-time measurement shared by the benchmark tools: medians of repeated calls, the calls
taking turns so that a change in the machine's load reaches each of them alike."""
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

__all__ = ["median_times", "median_time"]


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def median_times(calls: Dict[str, Callable], runs: int, warmup: int = 1, device="cpu") -> Dict[str, Tuple[float, List[float]]]:
    """name -> (median seconds, every timed run's seconds) of each function in ``calls``:
    ``warmup`` untimed calls each, then ``runs`` rounds in which every function runs once
    (a, b, c, a, b, c, ...). On a CUDA device each timed call is synchronised."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    _sync(device)
    times = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), t) for name, t in times.items()}


def median_time(fn: Callable, runs: int, warmup: int = 1, device="cpu") -> Tuple[float, List[float]]:
    """(median seconds, every run's seconds) of ``runs`` calls of ``fn`` after ``warmup``."""
    return median_times({"fn": fn}, runs, warmup, device)["fn"]
