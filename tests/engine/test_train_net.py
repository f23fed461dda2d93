"""train_net.py: exact resume, multi-process training (gloo on the CPU), output safety."""
import os

import pytest
import torch

from conftest import QUICKSTART, assert_same_training_state, register_coco_replacing, run, write_synthetic_coco

from soit.engine import training as train_net
from detectron2.config import LazyConfig
from detectron2.data.datasets import register_coco_instances


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("blobs"))
    write_synthetic_coco(root)
    name = "test_blobs_train"
    register_coco_replacing(name, os.path.join(root, "train.json"), os.path.join(root, "images"))
    return root


def make_cfg(output_dir, max_iter, dataset_root, extra=()):
    """The quick-start config on the synthetic dataset, shrunk for speed."""
    overrides = [
        f"train.output_dir={output_dir}",
        f"train.max_iter={max_iter}",
        "train.checkpointer.period=3",
        "train.log_period=1",
        "dataloader.train.dataset.names=test_blobs_train",
        "dataloader.train.total_batch_size=2",
        "model.transformer.num_queries=10",
        "model.transformer.num_decoder_layers=1",
        "model.transformer.ffn_dim=64",
        "model.mask_encoder.ffn_dim=64",
    ] + list(extra)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(QUICKSTART), overrides)
    # the test and evaluation datasets are not needed here
    del cfg.dataloader["evaluator"]
    return cfg


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_equals_uninterrupted_run(blobs, tmp_path, monkeypatch):
    full = run(make_cfg(tmp_path / "full", 6, blobs))
    assert full.iter == 6  # the loop ends one past the last iteration (5)

    # interrupted: the step after the checkpoint at iteration 2 fails
    original = train_net.SOITTrainer.run_step

    def crash_at_3(self):
        if self.iter == 3:
            raise KeyboardInterrupt("simulated interruption")
        return original(self)

    monkeypatch.setattr(train_net.SOITTrainer, "run_step", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(tmp_path / "resumed", 6, blobs))
    assert not (tmp_path / "resumed" / "model_final.pth").exists()
    monkeypatch.setattr(train_net.SOITTrainer, "run_step", original)
    resumed = run(make_cfg(tmp_path / "resumed", 6, blobs), resume=True)
    assert resumed.iter == 6

    a, b = load(tmp_path / "full" / "model_final.pth"), load(tmp_path / "resumed" / "model_final.pth")
    assert a["iteration"] == b["iteration"] == 5
    assert_same_training_state(a, b)
    # and the run really trained: weights moved away from the first checkpoint
    first = load(tmp_path / "resumed" / "model_0000002.pth")["model"]
    assert any(not torch.equal(first[k], a["model"][k]) for k in a["model"])


def test_refuses_to_overwrite_a_previous_run(blobs, tmp_path):
    run(make_cfg(tmp_path / "out", 3, blobs))
    with pytest.raises(SystemExit, match="--resume"):
        run(make_cfg(tmp_path / "out", 3, blobs))


def test_num_classes_must_match_the_dataset(blobs, tmp_path):
    with pytest.raises(ValueError, match="model.num_classes=1"):
        run(make_cfg(tmp_path / "nc", 3, blobs, ["model.num_classes=3"]))


def _distributed_worker(output_dir, dataset_root, result_dir):
    from detectron2.utils import comm

    json_file = os.path.join(dataset_root, "train.json")
    register_coco_instances("test_blobs_train", {}, json_file, os.path.join(dataset_root, "images"))
    cfg = make_cfg(output_dir, 4, dataset_root)
    trainer = run(cfg)
    model = getattr(trainer.model, "module", trainer.model)
    torch.save(
        # parameters only: BatchNorm running statistics are per rank (broadcast_buffers=False)
        {"model": {k: v.detach() for k, v in model.named_parameters()}, "saves": trainer.checkpointer.save_to_disk, "world": comm.get_world_size()},
        os.path.join(result_dir, f"rank{comm.get_rank()}.pth"),
    )


def test_two_process_training_averages_gradients(blobs, tmp_path):
    from soit.engine import launch

    out, res = tmp_path / "ddp", tmp_path / "res"
    res.mkdir()
    launch(_distributed_worker, 2, args=(str(out), blobs, str(res)))
    r0, r1 = load(res / "rank0.pth"), load(res / "rank1.pth")
    assert r0["world"] == r1["world"] == 2
    assert r0["saves"] and not r1["saves"]  # only rank 0 writes checkpoints
    for k in r0["model"]:
        torch.testing.assert_close(r0["model"][k], r1["model"][k], msg=k)
    final = load(out / "model_final.pth")
    for k in r0["model"]:
        torch.testing.assert_close(final["model"][k], r0["model"][k], msg=k)
