"""What the quick start leaves on disk: only its own files are replaced, a bad command line
loses nothing, a bounded number of checkpoints, strict JSON."""
import hashlib
import json
import math
import os

import pytest
import torch
from conftest import REPO, load_tool
from detectron2.checkpoint import Checkpointer
from detectron2.config import LazyCall as L
from omegaconf import OmegaConf

from soit.config import load_config
from soit.engine import training

quickstart = load_tool("quickstart")

MANIFEST = ".soit-quickstart.json"  # next to the marker: {"files": [...], "folders": [...]}, relative paths
QUICKSTART_CONFIGS = ["soit_nuclei_cpu.py", "soit_nuclei_cpu_multiscale.py", "soit_nuclei_cpu_paper.py"]


def checksums(folder):
    return {
        os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
        for d, _, files in os.walk(folder)
        for f in files
    }


def write_manifest(folder, files, folders=()):
    (folder / MANIFEST).write_text(json.dumps({"files": list(files), "folders": list(folders)}))


def previous_run(folder, files, folders=(), manifest=True):
    """A quick-start folder holding ``files`` (relative paths), listed in its manifest."""
    for name in folders:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("written by the quick start")
    (folder / quickstart.MARKER).write_text("x")
    if manifest:
        write_manifest(folder, files, folders)


# the files of a previous run
OURS = ["config.yaml", "log.txt", "metrics.json", "model_0000699.pth", "model_final.pth", "vis/a.png"]


# ---------------------------------------------------------------- --overwrite


def test_overwrite_removes_the_listed_files_and_keeps_the_users_look_alikes(tmp_path):
    previous_run(tmp_path, OURS, folders=["vis"])
    (tmp_path / "model_mine.pth").write_text("the user's model")
    (tmp_path / "events.out.tfevents.mine").write_text("the user's log")
    (tmp_path / "vis" / "mine.png").write_text("the user's picture")
    assert quickstart.clear_previous_run(str(tmp_path), overwrite=True) is None
    assert checksums(tmp_path).keys() == {"model_mine.pth", "events.out.tfevents.mine", "vis/mine.png"}


def test_overwrite_removes_a_listed_folder_once_empty(tmp_path):
    previous_run(tmp_path, OURS, folders=["vis"])
    (tmp_path / "notes.txt").write_text("added by the user")
    assert quickstart.clear_previous_run(str(tmp_path), overwrite=True) is None
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_overwrite_never_follows_a_link_out_of_the_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.json").write_text("elsewhere")
    (outside / "notes.txt").write_text("elsewhere")
    run = tmp_path / "run"
    run.mkdir()
    previous_run(run, ["metrics.json"])
    write_manifest(run, ["metrics.json", "inference/a.json", "notes.txt"], ["inference"])
    os.symlink(outside, run / "inference")
    os.symlink(outside / "notes.txt", run / "notes.txt")
    before = checksums(outside)
    assert quickstart.clear_previous_run(str(run), overwrite=True) is None
    assert checksums(outside) == before
    assert sorted(os.listdir(run)) == ["inference", "notes.txt"]  # the links, left alone


@pytest.mark.parametrize("link", ["model_final.pth", "vis"])
def test_a_link_where_the_new_run_writes_is_refused(tmp_path, link):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model_final.pth").write_text("elsewhere")
    run = tmp_path / "run"
    run.mkdir()
    previous_run(run, ["metrics.json"])
    write_manifest(run, ["metrics.json", link], [])
    os.symlink(outside / "model_final.pth" if link.endswith(".pth") else outside, run / link)
    before = checksums(tmp_path)
    message = quickstart.clear_previous_run(str(run), overwrite=True)
    assert message and link in message and "Nothing was changed" in message
    assert checksums(tmp_path) == before


@pytest.mark.parametrize("entry", ["../victim.txt", "/etc/passwd", "", ".", "a/../../victim.txt"])
def test_a_manifest_naming_paths_outside_the_folder_is_refused(tmp_path, entry):
    (tmp_path / "victim.txt").write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    previous_run(run, ["metrics.json"])
    write_manifest(run, ["metrics.json", entry], [])
    before = checksums(tmp_path)
    message = quickstart.clear_previous_run(str(run), overwrite=True)
    assert message and "not a path inside" in message and "Nothing was changed" in message
    assert checksums(tmp_path) == before


def test_a_previous_run_without_a_manifest_is_refused(tmp_path):
    previous_run(tmp_path, ["metrics.json", "model_final.pth"], manifest=False)
    before = checksums(tmp_path)
    message = quickstart.clear_previous_run(str(tmp_path), overwrite=True)
    assert message and MANIFEST in message and "--output-dir" in message
    assert checksums(tmp_path) == before


def test_user_files_the_run_would_overwrite_are_refused(tmp_path):
    previous_run(tmp_path, ["metrics.json"])
    (tmp_path / "log.txt").write_text("the user's log")
    before = checksums(tmp_path)
    message = quickstart.clear_previous_run(str(tmp_path), overwrite=True)
    assert message and "log.txt" in message and "Nothing was changed" in message
    assert checksums(tmp_path) == before


def test_a_folder_not_written_by_the_quick_start_is_refused(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    assert "was not written by the quick start" in quickstart.clear_previous_run(str(tmp_path), overwrite=True)
    previous_run(tmp_path / "run", ["metrics.json"])
    assert quickstart.clear_previous_run(str(tmp_path / "run"), overwrite=False).endswith("(or --output-dir DIR).")
    assert (tmp_path / "thesis.tex").exists() and (tmp_path / "run" / "metrics.json").exists()


def test_what_a_run_writes_is_recorded_and_removed_by_the_next_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("the user's")
    before = quickstart.snapshot(str(tmp_path))
    quickstart.start_run(str(tmp_path), before)
    # what the training loop and the quick start write, names the quick start does not know included
    written = ["model_0000099.pth", "model_final.pth", "events.out.tfevents.123.host", "vis/a_pred.png", "inference/x"]
    for name in written:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("run")
    quickstart.record_run(str(tmp_path), before)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert sorted(manifest["folders"]) == ["inference", "vis"]
    assert quickstart.clear_previous_run(str(tmp_path), overwrite=True) is None
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


# ---------------------------------------------------------------- nothing lost before the checks


@pytest.fixture
def no_data_preparation(monkeypatch):
    """The dataset is never prepared in these tests: a refusal comes before it."""
    import soit.data.nuclei

    def refuse(*args, **kwargs):
        raise AssertionError("the dataset was prepared before the command line was checked")

    monkeypatch.setattr(soit.data.nuclei, "prepare_nuclei", refuse)


@pytest.mark.parametrize(
    "argv, said",
    [
        (["train.max_iters=2"], "max_iters"),
        (["--config-file", os.path.join(REPO, "configs", "quickstart", "nope.py")], "nope.py"),
        (["train.max_iter"], "not key=value"),
        (["train.output_dir=/tmp/elsewhere"], "--output-dir"),
    ],
)
def test_a_bad_command_line_loses_no_previous_run(tmp_path, capsys, no_data_preparation, argv, said):
    previous_run(tmp_path, OURS, folders=["vis"])
    before = checksums(tmp_path)
    assert quickstart.main(["--output-dir", str(tmp_path), "--overwrite", *argv]) == 2
    assert said in capsys.readouterr().out
    assert checksums(tmp_path) == before


def test_the_standard_trust_flags_are_accepted():
    args = quickstart.parse_args(["--trust-config", "--trust-pickle", "train.max_iter=2"])
    assert args.trust_config and args.trust_pickle and args.opts == ["train.max_iter=2"]


# ---------------------------------------------------------------- checkpoint retention


def saving_loop(folder, cfg, start, stop, max_iter):
    """Steps ``start..stop-1`` of a run checkpointed as ``do_train`` does; returns the
    iteration it would resume from."""
    model = torch.nn.Linear(2, 2)
    checkpointer = Checkpointer(model, str(folder))
    if start:
        assert checkpointer.resume_or_load("", resume=True)["iteration"] == start - 1
    hook = training.periodic_checkpointer(cfg, checkpointer, start)
    hook.max_iter = max_iter
    for iteration in range(start, stop):
        hook.step(iteration)
    return checkpointer.resume_or_load("", resume=True)["iteration"] + 1


@pytest.mark.parametrize("name", QUICKSTART_CONFIGS)
def test_the_quick_start_keeps_two_periodic_checkpoints_and_the_final_one(tmp_path, name):
    cfg = load_config(os.path.join(REPO, "configs", "quickstart", name))
    assert cfg.train.checkpointer.max_to_keep == 2
    saving_loop(tmp_path, cfg, 0, cfg.train.max_iter, cfg.train.max_iter)
    last = cfg.train.max_iter - 1
    period = cfg.train.checkpointer.period
    periodic = [f"model_{i:07d}.pth" for i in range(last - period, last + 1, period)]
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", *periodic, "model_final.pth"]


def test_a_resumed_run_keeps_the_same_number_of_checkpoints(tmp_path):
    cfg = OmegaConf.create({"train": {"checkpointer": {"period": 10, "max_to_keep": 2}}})
    (tmp_path / "model_0000005.pth").write_text("not a periodic checkpoint name of this run: kept")
    # interrupted after iteration 34: checkpoints of iterations 19 and 29 are kept
    assert saving_loop(tmp_path, cfg, 0, 35, 60) == 30
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pth")) == [
        "model_0000005.pth", "model_0000019.pth", "model_0000029.pth"
    ]  # fmt: skip
    assert saving_loop(tmp_path, cfg, 30, 60, 60) == 60
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pth")) == [
        "model_0000005.pth", "model_0000049.pth", "model_0000059.pth", "model_final.pth"
    ]  # fmt: skip


def test_without_max_to_keep_every_checkpoint_is_kept(tmp_path):
    cfg = OmegaConf.create({"train": {"checkpointer": {"period": 10}}})
    saving_loop(tmp_path, cfg, 0, 35, 40)
    saving_loop(tmp_path, cfg, 30, 40, 40)
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pth")) == [
        "model_0000009.pth", "model_0000019.pth", "model_0000029.pth", "model_0000039.pth", "model_final.pth"
    ]  # fmt: skip


# ---------------------------------------------------------------- strict JSON


def strict_load(path):
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which strict JSON readers reject")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def test_undefined_metrics_are_written_as_null(tmp_path):
    import numpy as np

    path = str(tmp_path / "m.json")
    metrics = {"segm": {"AP": 12.5, "APl": math.nan, "APs": np.float32("nan")}, "x": [math.inf, 1, True, None, "a"]}
    training.write_json(path, metrics)
    assert strict_load(path) == {"segm": {"AP": 12.5, "APl": None, "APs": None}, "x": [None, 1, True, None, "a"]}


def nothing():
    return None


def test_do_test_writes_strict_json(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "inference_on_dataset", lambda *a: {"segm": {"AP": 3.0, "APl": math.nan}})
    cfg = OmegaConf.create({"train": {"output_dir": str(tmp_path)}, "dataloader": {}})
    cfg.dataloader.test, cfg.dataloader.evaluator = L(nothing)(), L(nothing)()
    results = training.do_test(cfg, model=None)
    assert math.isnan(results["segm"]["APl"])  # the caller still gets detectron2's numbers
    assert strict_load(tmp_path / "eval_results.json") == {"segm": {"AP": 3.0, "APl": None}}
