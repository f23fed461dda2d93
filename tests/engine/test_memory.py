"""soit/engine/memory.py and tools/analyze_model.py --tasks memory: the CPU peak follows the
allocations, checkpointing lowers it with the same gradients, the GPU-size column."""
import os

import pytest
import torch
from conftest import QUICKSTART, REPO, load_tool

from soit.engine.memory import _cpu_peak, fits, largest_relative_difference, synthetic_batch

MIB = 2**20
TINY = os.path.join(REPO, "configs", "models", "soit_tiny.py")


def test_the_cpu_peak_is_the_largest_live_total():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.empty(40 * MIB // 4)  # 40 MiB
        b = torch.empty(20 * MIB // 4)  # 60 live
        del a
        c = torch.empty(30 * MIB // 4)  # 50 live
        del b, c
    assert 60 * MIB <= _cpu_peak(prof) < 61 * MIB


def test_synthetic_batch_has_the_objects_asked_for():
    batch = synthetic_batch(2, 64, 96, 5, num_classes=3)
    assert len(batch) == 2
    for x in batch:
        inst = x["instances"]
        assert x["image"].shape == (3, 64, 96) and len(inst) == 5
        assert inst.gt_masks.tensor.flatten(1).any(1).all() and int(inst.gt_classes.max()) < 3
        boxes = inst.gt_boxes.tensor
        assert (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 64).all() and (boxes[:, :2] >= 0).all()


def test_gpu_sizes_add_the_stated_margin():
    gib = 2**30
    assert fits(5.8 * gib, 8) and not fits(5.8 * gib, 7.9)  # 5.8 x 1.2 + 1 = 7.96
    assert not fits(6 * gib + 1, 8.2)
    assert fits(7 * gib, 8, measured_on_gpu=True) and not fits(7.5 * gib, 8, measured_on_gpu=True)
    a = {"w": torch.tensor([1.0, -2.0])}
    assert largest_relative_difference(a, {"w": torch.tensor([1.0, -2.002])}) == pytest.approx(1e-3, rel=1e-3)
    assert largest_relative_difference(a, {"v": torch.zeros(2)}) is None


def test_memory_table_checkpointing_lowers_the_peak_with_the_same_gradients(capsys):
    tool = load_tool("analyze_model")
    tool.main([
        "--config-file", TINY, "--tasks", "memory", "--input-size", "384", "384", "--batch-sizes", "1",
        "--checkpointing", "none", "all", "--compare-gradients", "--num-objects", "8",
    ])  # fmt: skip
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |")]
    assert [r[2] for r in rows] == ["none", "all"]
    # columns: batch, precision, checkpointing, parameters, AdamW state, step peak, of which gradients
    peaks = [float(r[5].replace(",", "")) for r in rows]
    grads = [float(r[6].replace(",", "")) for r in rows]
    assert grads[0] == grads[1] > 0
    activations = [p - g for p, g in zip(peaks, grads)]  # what checkpointing acts on
    assert 0 < activations[1] < 0.75 * activations[0]
    assert rows[0][-1].strip(" |") == "(reference)" and float(rows[1][-1].strip(" |")) < 1e-5


def test_bad_memory_arguments_are_named(capsys):
    tool = load_tool("analyze_model")
    for bad in (["--checkpointing", "neck"], ["--precisions", "fp8"], ["--batch-sizes", "0"]):
        with pytest.raises(SystemExit):
            tool.main(["--config-file", QUICKSTART, "--tasks", "memory", *bad])
        assert bad[0] in capsys.readouterr().err
