"""Fine-tuning converted official weights on a dataset with another number of classes."""
import os

import torch
from detectron2.config import LazyConfig

from conftest import QUICKSTART, register_coco_replacing, run, shared_file, write_synthetic_coco
from soit.checkpoint import convert_checkpoint, infer_architecture, model_config_for


def test_finetune_converted_official_weights_with_one_class(tmp_path):
    official = shared_file("fixtures", "official_small.pt")
    converted = str(tmp_path / "official_small_d2.pth")
    convert_checkpoint(official, converted)

    root = str(tmp_path / "blobs")
    write_synthetic_coco(root)
    name = "test_finetune_blobs"
    register_coco_replacing(name, os.path.join(root, "train.json"), os.path.join(root, "images"))

    cfg = LazyConfig.load(QUICKSTART)
    arch = infer_architecture(torch.load(official, weights_only=True)["state_dict"])
    cfg.model = model_config_for(arch)  # the checkpoint's architecture: R-18, 2+2 layers, 80 classes
    cfg = LazyConfig.apply_overrides(
        cfg,
        [
            "model.num_classes=1",  # the new dataset has one class: the class branches start afresh
            "model.transformer.num_queries=20",
            f"train.init_checkpoint={converted}",
            f"train.output_dir={tmp_path / 'out'}",
            "train.max_iter=2",
            "train.log_period=1",
            f"dataloader.train.dataset.names={name}",
        ],
    )
    del cfg.dataloader["evaluator"]
    trainer = run(cfg)
    assert trainer.iter == 2

    log = open(tmp_path / "out" / "log.txt").read()
    n = arch["num_decoder_layers"]
    for i in range(n + 1):  # per-layer branches + the proposal branch
        assert f"cls_branches.{i}.weight" in log and f"cls_branches.{i}.bias" in log
    assert "incompatible shapes" in log
    # everything else came from the checkpoint: only the class branches are listed as missing
    missing = log.split("not found in the checkpoint:\n", 1)[1].split("\n[", 1)[0].split()
    assert missing and all(m.startswith("cls_branches.") or m in ("{bias,", "weight}") for m in missing), missing
    state = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)["model"]
    assert state["cls_branches.0.weight"].shape == (1, arch["embed_dim"])
