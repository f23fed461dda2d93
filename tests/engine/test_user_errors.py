"""Bad inputs through the entry points a user calls: each is named, nothing is lost."""
import hashlib
import json
import logging
import os

import pytest
import torch
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog, MetadataCatalog
from conftest import (
    REPO,
    dataset_overrides,
    load_tool,
    register_coco_replacing,
    save_random_quickstart_weights,
    write_synthetic_coco,
)

from soit.engine import training as train_net
from soit.checkpoint.safe_load import IncompleteCheckpointError
from soit.data.metadata import dataset_metadata
from soit.engine import Predictor
from soit.engine.overrides import apply_overrides

quickstart = load_tool("quickstart")

QUICKSTART = os.path.join(REPO, "configs", "quickstart", "soit_nuclei_cpu.py")


def checksums(folder):
    return {
        os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
        for d, _, files in os.walk(folder)
        for f in files
    }


@pytest.fixture(scope="module")
def two_class_data(tmp_path_factory):
    """A registered COCO dataset with two classes ("cell", "debris"), never loaded."""
    root = str(tmp_path_factory.mktemp("two_classes"))
    write_synthetic_coco(root, num_images=2)
    path = os.path.join(root, "train.json")
    data = json.load(open(path))
    data["categories"] = [{"id": 7, "name": "debris"}, {"id": 3, "name": "cell"}]
    for a in data["annotations"]:
        a["category_id"] = 3
    json.dump(data, open(path, "w"))
    name = "test_user_errors_two_classes"
    register_coco_replacing(name, path, os.path.join(root, "images"))
    return name


@pytest.fixture(scope="module")
def one_class_weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("weights") / "one_class.pth")
    save_random_quickstart_weights(path)
    return path


def test_misspelt_override_is_refused_with_the_closest_keys():
    cfg = LazyConfig.load(QUICKSTART)
    with pytest.raises(KeyError, match=r"train has no key 'max_iters' \(did you mean train.max_iter\?\)"):
        apply_overrides(cfg, ["train.max_iters=2"])
    with pytest.raises(KeyError, match="the config has no key 'trian'"):
        apply_overrides(cfg, ["trian.max_iter=2"])
    with pytest.raises(KeyError, match=r"train.checkpointer has no key 'perod' \(did you mean train.checkpointer.period\?\)"):
        apply_overrides(cfg, ["train.checkpointer.perod=2"])
    with pytest.raises(ValueError, match="not key=value"):
        apply_overrides(cfg, ["train.max_iter"])
    # existing keys, list items and new arguments of a LazyCall are accepted
    cfg = apply_overrides(cfg, ["train.max_iter=2", "model.reference_size=128", "dataloader.train.mapper.augmentation.0.prob=0.25"])  # noqa: E501
    assert cfg.train.max_iter == 2 and cfg.model.reference_size == 128
    assert cfg.dataloader.train.mapper.augmentation[0].prob == 0.25
    args = train_net.argument_parser().parse_args(["--config-file", QUICKSTART, "train.max_iters=2"])
    with pytest.raises(KeyError, match="max_iters"):
        train_net.main(args)


def test_class_names_of_a_registered_dataset_without_loading_it(two_class_data, one_class_weights):
    meta = dataset_metadata(two_class_data)
    assert meta.thing_classes == ["cell", "debris"]  # sorted by category id, as load_coco_json does
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
    DatasetCatalog.get(two_class_data)  # loading it later agrees (detectron2 asserts equality)
    assert MetadataCatalog.get(two_class_data).thing_classes == ["cell", "debris"]
    predictor = Predictor(QUICKSTART, checkpoint=one_class_weights,
                          overrides=[f"dataloader.test.dataset.names={two_class_data}", "model.num_classes=1"])  # fmt: skip
    assert predictor.metadata.thing_classes == ["cell", "debris"]


def test_eval_only_refuses_class_count_mismatch_and_foreign_checkpoints(two_class_data, one_class_weights, tmp_path):
    def eval_only(*overrides):
        args = train_net.argument_parser().parse_args(
            ["--config-file", QUICKSTART, "--eval-only", f"train.output_dir={tmp_path / 'eval'}",
             f"dataloader.test.dataset.names={two_class_data}", f"dataloader.evaluator.dataset_name={two_class_data}",
             *overrides]
        )  # fmt: skip
        return train_net.main(args)

    # the model has 1 class, the dataset 2: refused before any evaluation
    with pytest.raises(ValueError, match=rf"{two_class_data}' has 2 classes but model.num_classes=1"):
        eval_only(f"train.init_checkpoint={one_class_weights}")
    # the checkpoint has 1 class, the model 2: its classifier would stay random
    with pytest.raises(IncompleteCheckpointError, match=r"(?s)one_class.pth.*classifier has 1 outputs.*num_classes=1"):
        eval_only(f"train.init_checkpoint={one_class_weights}", "model.num_classes=2")
    # a checkpoint holding nothing of the model
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"something.else": torch.zeros(3)}}, foreign)
    with pytest.raises(IncompleteCheckpointError, match=r"foreign.pth does not set \d+ of the model's"):
        eval_only(f"train.init_checkpoint={foreign}", "model.num_classes=2")
    with pytest.raises(SystemExit, match="--eval-only needs the weights"):
        eval_only("model.num_classes=2")
    assert not os.path.exists(tmp_path / "eval" / "eval_results.json")
    # the same checkpoint is refused by the Predictor
    with pytest.raises(IncompleteCheckpointError, match="foreign.pth"):
        Predictor(QUICKSTART, checkpoint=str(foreign))


def test_refused_training_leaves_the_run_folder_unchanged(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("the previous run's config\n")
    (run / "last_checkpoint").write_text("model_final.pth")
    (run / "model_final.pth").write_bytes(b"weights")
    before = checksums(run)
    args = train_net.argument_parser().parse_args(
        ["--config-file", QUICKSTART, f"train.output_dir={run}", "train.max_iter=1"]
    )
    with pytest.raises(SystemExit, match="already holds a training run"):
        train_net.main(args)
    assert checksums(run) == before


def test_damaged_last_checkpoint_on_resume_is_named_with_the_alternatives(tmp_path):
    (tmp_path / "model_0000009.pth").write_bytes(b"")
    (tmp_path / "model_final.pth").write_bytes(b"truncated")
    with pytest.raises(SystemExit, match=r"(?s)model_final.pth cannot be read.*model_0000009.pth"):
        train_net.resume_iteration(str(tmp_path / "model_final.pth"))


def test_quickstart_overwrite_removes_only_what_it_wrote(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    before = checksums(foreign)
    # a folder the quick start did not write is refused even with --overwrite
    assert quickstart.main(["--output-dir", str(foreign), "--overwrite"]) == 2
    assert checksums(foreign) == before
    previous = tmp_path / "previous"
    (previous / "vis").mkdir(parents=True)
    for name in (quickstart.MARKER, "metrics.json", "model_final.pth", "last_checkpoint", "vis/a_pred.png"):
        (previous / name).write_text("x")
    quickstart.record_run(str(previous), before=set())  # the run's list of what it wrote
    (previous / "notes.txt").write_text("added by the user")
    assert quickstart.clear_previous_run(str(previous), overwrite=False).endswith("(or --output-dir DIR).")
    assert len(checksums(previous)) == 7
    assert quickstart.clear_previous_run(str(previous), overwrite=True) is None
    assert sorted(os.listdir(previous)) == ["notes.txt"]


def test_an_image_too_small_for_the_queries_is_named_in_prediction_and_export(one_class_weights, tmp_path, caplog):
    import cv2
    export_model = load_tool("deploy/export_model")
    import numpy as np

    from soit.modeling.transformer import TooFewTokensError

    small = np.full((40, 48, 3), 128, np.uint8)
    predictor = Predictor(QUICKSTART, checkpoint=one_class_weights, overrides=["model.test_scales=[]"])
    with pytest.raises(TooFewTokensError, match=r"input 0 \(48x40\) too small for the model .*cannot give 100 proposals"):
        predictor(small)
    # the scale search ([0.5, 1, 2]) skips, with a warning naming the image, the factors too
    # small for the model and predicts at the one that fits (x2)
    searching = Predictor(QUICKSTART, checkpoint=one_class_weights, overrides=["model.test_scales=[0.5,1,2]"])
    with caplog.at_level(logging.WARNING, logger="soit.modeling.meta_arch"):
        instances = searching(small)
    assert instances.image_size == (40, 48)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2 and "test scale 0.5 skipped" in skipped[0] and "test scale 1 skipped" in skipped[1]
    assert "(48x40) too small" in skipped[1]
    with pytest.raises(TooFewTokensError, match=r"\(48x40\) too small"):  # too small at every factor
        Predictor(QUICKSTART, checkpoint=one_class_weights, overrides=["model.test_scales=[0.5,1]"])(small)
    path = str(tmp_path / "small.png")
    cv2.imwrite(path, small)
    out = tmp_path / "export"
    args = ["--config-file", QUICKSTART, "--format", "torchscript", "--output", str(out), "--sample-image", path,
            f"train.init_checkpoint={one_class_weights}"]  # fmt: skip
    with pytest.raises(TooFewTokensError, match=r"48x40"):
        export_model.main(args)
    assert not out.exists()
    truncated = tmp_path / "truncated.png"
    cv2.imwrite(str(truncated), np.full((300, 300, 3), 9, np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:100])
    args[args.index(path)] = str(truncated)
    with pytest.raises(ValueError, match=r"--sample-image .*truncated.png is not a readable image"):
        export_model.main(args)
    assert not out.exists()


def test_unreadable_images_are_logged_in_the_run_log_and_none_readable_is_said(tmp_path, synthetic_dataset):
    root = str(tmp_path / "data")
    write_synthetic_coco(root, num_images=2)
    for name in ("img0.png", "img1.png"):
        with open(os.path.join(root, "images", name), "wb") as f:
            f.write(b"not an image")
    name = "test_user_errors_unreadable"
    register_coco_replacing(name, os.path.join(root, "train.json"), os.path.join(root, "images"))
    run = tmp_path / "run"
    args = train_net.argument_parser().parse_args(
        ["--config-file", QUICKSTART, f"train.output_dir={run}", "train.max_iter=1", "dataloader.train.total_batch_size=1",
         *dataset_overrides(name, synthetic_dataset), "dataloader.train.num_workers=0"]
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="none of the 2 images of the dataset could be read"):
        train_net.main(args)
    log = (run / "log.txt").read_text()
    assert "img0.png" in log and "img1.png" in log


def test_an_invalid_annotation_file_is_named_before_training(tmp_path, synthetic_dataset):
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [{"id": 1,')
    (tmp_path / "images").mkdir()
    run = tmp_path / "run"
    args = train_net.argument_parser().parse_args(
        ["--config-file", QUICKSTART, "--register-coco", "test_user_errors_broken", str(broken), str(tmp_path / "images"),
         f"train.output_dir={run}", "train.max_iter=1", *dataset_overrides("test_user_errors_broken", synthetic_dataset)]
    )  # fmt: skip
    with pytest.raises(ValueError, match=rf"{broken} is not valid JSON"):
        train_net.main(args)
    assert not (run / "last_checkpoint").exists()
