"""User files that would run code are refused at every entry point; real checkpoints still load."""
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import REPO, Touch, dataset_overrides, load_tool, save_random_quickstart_weights
from detectron2.config import LazyConfig, instantiate

from soit.engine import training as train_net
from soit.checkpoint.safe_load import SafeCheckpointer, UnsafeFileError, load_checkpoint_file
from soit.config import load_config
from soit.engine import Predictor
from soit.modeling import SOIT

demo = load_tool("demo")
export_model = load_tool("deploy/export_model")

QUICKSTART = os.path.join(REPO, "configs", "quickstart", "soit_nuclei_cpu.py")
FAST = ["model.max_detections=5"]


@pytest.fixture(scope="module")
def state():
    return save_random_quickstart_weights(None)


@pytest.fixture()
def crafted(tmp_path, state):
    """A crafted .pkl, a crafted .pth and two crafted .yaml configs; each would create
    ``marker`` if executed."""
    marker = tmp_path / "executed"
    files = {"marker": marker}
    files["pkl"] = tmp_path / "evil.pkl"
    with open(files["pkl"], "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": Touch(marker)}, f)
    files["pth"] = tmp_path / "evil.pth"
    torch.save({"model": state, "extra": Touch(marker)}, files["pth"])
    files["yaml_tag"] = tmp_path / "tag.yaml"
    files["yaml_tag"].write_text(f"model: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    files["yaml_target"] = tmp_path / "target.yaml"
    cfg = LazyConfig.load(QUICKSTART)
    LazyConfig.save(cfg, str(files["yaml_target"]))
    text = files["yaml_target"].read_text()
    # a real run's config.yaml with one callable swapped for one that writes a file
    assert "_target_: soit.modeling.SOIT" in text
    files["yaml_target"].write_text(
        text.replace("_target_: soit.modeling.SOIT", f"_target_: builtins.open\n  _args_: ['{marker}', 'w']", 1)
    )
    return files


def test_checkpoints_needing_code_are_refused_naming_file_and_opt_in(crafted):
    for key in ("pkl", "pth"):
        with pytest.raises(UnsafeFileError, match=rf"(?s){crafted[key].name}.*--trust-pickle"):
            load_checkpoint_file(crafted[key])
    assert not crafted["marker"].exists()
    # the opt-in reads them (and so runs their code)
    load_checkpoint_file(crafted["pth"], trust_pickle=True)
    assert crafted["marker"].exists()


def test_files_that_are_not_checkpoints_are_named_without_the_opt_in(tmp_path, state):
    good = tmp_path / "good.pth"
    torch.save({"model": state}, good)
    cases = {
        "random.pth": os.urandom(2000),
        "text.pth": b"hello\n",
        "truncated.pth": good.read_bytes()[:5000],
        "random.pkl": os.urandom(2000),
        "truncated.pkl": pickle.dumps({"model": {"a": np.ones(3)}, "__author__": "x"})[:20],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="not a readable") as info:
            load_checkpoint_file(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and "trust" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint_file(tmp_path / "missing.pth")


def test_detectron2_pkl_loads_and_predicts_as_its_pth(tmp_path, state, nuclei):
    """Model-zoo format (numpy arrays, __author__, matching_heuristics) and Caffe2 format."""
    pth, pkl, c2 = tmp_path / "m.pth", tmp_path / "m.pkl", tmp_path / "c2.pkl"
    torch.save({"model": state}, pth)
    arrays = {k: v.numpy() for k, v in state.items()}
    with open(pkl, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "me", "matching_heuristics": True}, f, protocol=2)
    with open(c2, "wb") as f:
        pickle.dump({"blobs": arrays}, f)
    import cv2

    image = cv2.imread(os.path.join(nuclei["image_root"], "top_left.png"))[:200, :240]
    outputs = [Predictor(QUICKSTART, checkpoint=str(p), overrides=FAST)(image) for p in (pth, pkl)]
    assert torch.equal(outputs[1].pred_masks, outputs[0].pred_masks)
    assert torch.equal(outputs[1].scores, outputs[0].scores)
    # Caffe2 files hold Caffe2 blob names (detectron2 renames them while loading): read as such
    read = load_checkpoint_file(c2)
    assert read["__author__"] == "Caffe2" and read["matching_heuristics"]
    assert all(np.array_equal(read["model"][k], v) for k, v in arrays.items())
    model = instantiate(LazyConfig.load(QUICKSTART).model)
    SafeCheckpointer(model).load(str(pkl))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_predictor_demo_train_net_and_export_refuse_crafted_checkpoints(crafted, nuclei, synthetic_dataset, tmp_path):
    image = os.path.join(nuclei["image_root"], "top_left.png")
    for key in ("pkl", "pth"):
        path = str(crafted[key])
        with pytest.raises(UnsafeFileError, match=crafted[key].name):
            Predictor(QUICKSTART, checkpoint=path, overrides=FAST)
        with pytest.raises(UnsafeFileError, match=crafted[key].name):
            demo.main(["--config-file", QUICKSTART, "--weights", path, "--input", image,
                       "--output", str(tmp_path / "drawn"), *FAST])  # fmt: skip
        args = train_net.argument_parser().parse_args(
            ["--config-file", QUICKSTART, "--eval-only", f"train.init_checkpoint={path}",
             f"train.output_dir={tmp_path / 'eval'}", *dataset_overrides(test=synthetic_dataset)]
        )  # fmt: skip
        with pytest.raises(UnsafeFileError, match=crafted[key].name):
            train_net.main(args)
        args = train_net.argument_parser().parse_args(
            ["--config-file", QUICKSTART, f"train.init_checkpoint={path}", "train.max_iter=1",
             f"train.output_dir={tmp_path / ('train_' + key)}", *dataset_overrides(synthetic_dataset, synthetic_dataset)]
        )  # fmt: skip
        with pytest.raises(UnsafeFileError, match=crafted[key].name):
            train_net.main(args)
        assert not (tmp_path / f"train_{key}" / "model_final.pth").exists()
        with pytest.raises(UnsafeFileError, match=crafted[key].name):
            export_model.main(["--config-file", QUICKSTART, "--format", "torchscript", "--output",
                               str(tmp_path / "export"), f"train.init_checkpoint={path}"])  # fmt: skip
    assert not crafted["marker"].exists()
    assert not (tmp_path / "drawn").exists()


def test_yaml_configs_that_run_code_are_refused_everywhere(crafted, nuclei, tmp_path):
    image = os.path.join(nuclei["image_root"], "top_left.png")
    for key, what in (("yaml_tag", "Python object tag"), ("yaml_target", "builtins.open")):
        path = str(crafted[key])
        match = rf"(?s){crafted[key].name}.*{what}.*--trust-config"
        with pytest.raises(UnsafeFileError, match=match):
            load_config(path)
        with pytest.raises(UnsafeFileError, match=match):
            Predictor(path)
        with pytest.raises(UnsafeFileError, match=match):
            demo.main(["--config-file", path, "--input", image, "--output", str(tmp_path / "drawn")])
        with pytest.raises(UnsafeFileError, match=match):
            train_net.main(train_net.argument_parser().parse_args(["--config-file", path, "--eval-only"]))
        with pytest.raises(UnsafeFileError, match=match):
            export_model.main(["--config-file", path, "--format", "onnx", "--output", str(tmp_path / "export")])
    assert not crafted["marker"].exists()


def test_a_saved_run_config_loads_as_before(tmp_path):
    """A run folder's config.yaml (LazyConfig.save of a shipped config) is accepted."""
    cfg = LazyConfig.load(QUICKSTART)
    path = str(tmp_path / "config.yaml")
    LazyConfig.save(cfg, path)
    loaded = load_config(path)
    assert loaded.model._target_ is SOIT  # the checked callable itself, as in the .py config
    assert instantiate(loaded.model).state_dict().keys() == instantiate(cfg.model).state_dict().keys()
