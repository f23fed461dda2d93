"""Hostile YAML configs, each run through every entry point that reads a config.

Every payload would create a marker file if it ran. Each case must be refused before
anything is instantiated, naming the file and the opt-in, and the marker must not exist.
"""
import copy
import itertools
import os
import pickle
import sys

import pytest
import yaml
from PIL import Image
from conftest import REPO, Touch, load_tool
from detectron2.config import LazyConfig

from soit.checkpoint.safe_load import UnsafeFileError
from soit.config import load_config
from soit.config.targets import _MODULES
from soit.engine import Predictor
from soit.engine import training as train_net

sys.path.insert(0, os.path.dirname(__file__))
from chains import find_chains  # noqa: E402

QUICKSTART = os.path.join(REPO, "configs", "quickstart", "soit_nuclei_cpu.py")


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    """A real run folder's config.yaml (LazyConfig.save of the quick-start config)."""
    path = tmp_path_factory.mktemp("run") / "config.yaml"
    LazyConfig.save(LazyConfig.load(QUICKSTART), str(path))
    return path.read_text()


def _dump(base, **changes):
    """The run config (parsed) with top-level ``changes``, as YAML text."""
    data = copy.deepcopy(base)
    data.update(changes)
    return yaml.safe_dump(data, sort_keys=False)


def hostile_cases(run_config, marker, evil_pickle, chains):
    """name -> (YAML text, what the refusal names)."""
    base = yaml.safe_load(run_config)
    touch = f"touch {marker}"
    without_model = _dump({k: v for k, v in base.items() if k != "model"})
    nested = copy.deepcopy(base)
    nested["dataloader"]["train"]["mapper"]["augmentation"].insert(0, {"_target_": "builtins.exec", "source": f"open('{marker}', 'w')"})
    proposals = copy.deepcopy(base)
    for split in ("train", "test"):
        proposals["dataloader"][split]["dataset"]["proposal_files"] = [str(evil_pickle)]
    cases = {
        # the module attribute ``subprocess`` that soit/data/packaged.py imports
        "packaged_subprocess": (_dump(base, model={"_target_": "soit.data.packaged.subprocess.run", "args": touch, "shell": True}), "subprocess.run"),
        # ``os`` reached through attributes of an allowed module
        "torch_os_popen": (_dump(base, model={"_target_": "torch.nn.functional.torch.os.popen", "cmd": touch}), "os.popen"),
        # the check must not read the text before OmegaConf resolves the interpolation
        "interpolated_target": (
            _dump(base, x="functional.torch.os.system", model={"_target_": "torch.nn.${x}", "command": touch}), "interpolation",
        ),
        # a resolver builds a callable node only when the config is resolved
        "oc_create": (_dump(base, model={"_target_": "soit.modeling.SOIT", "backbone": f"${{oc.create:{{_target_: os.system, command: '{touch}'}}}}"}), "oc.create"),
        "oc_decode": (_dump(base, model={"_target_": "soit.modeling.SOIT", "backbone": f"${{oc.decode:'{{_target_: os.system, command: {touch}}}'}}"}), "oc.decode"),
        # deep inside a list of augmentations
        "nested_in_list": (_dump(nested), "builtins.exec"),
        # a _target_ that is itself a node
        "target_is_a_node": (_dump(base, model={"_target_": {"_target_": "os.system", "command": touch}}), "expected a dotted name"),
        # YAML merge keys and anchors
        "merge_key": (
            without_model + f"evil: &evil\n  _target_: subprocess.run\n  args: {touch}\n  shell: true\nmodel:\n  <<: *evil\n",
            "subprocess.run",
        ),
        # Python tags: every entry point must read YAML with the safe loader
        "python_tag": (without_model + f"model: !!python/object/apply:os.system ['{touch}']\n", "Python object tag"),
        # a legitimate run config whose datasets make detectron2 unpickle a file
        "proposal_files": (_dump(proposals), "proposal_files"),
    }  # fmt: skip
    for dangerous, chain in chains.items():
        cases[f"chain_to_{dangerous}"] = (_dump(base, model={"_target_": chain}), chain)
    return cases


@pytest.fixture(scope="module")
def one_chain_per_module():
    """The shortest generated chain to each dangerous module (see chains.py)."""
    best = {}
    for (_, dangerous), found in find_chains(_MODULES | {"soit.data.packaged"}).items():
        for chain in found:
            if dangerous not in best or len(chain) < len(best[dangerous]):
                best[dangerous] = chain
    assert {"os", "subprocess", "builtins", "importlib", "pickle", "shutil", "sys"} <= set(best), best
    return best


@pytest.fixture()
def corpus(tmp_path, run_config, one_chain_per_module):
    marker = tmp_path / "executed"
    evil_pickle = tmp_path / "proposals.pkl"
    with open(evil_pickle, "wb") as f:
        pickle.dump({"ids": [], "boxes": [], "objectness_logits": [], "x": Touch(marker)}, f)
    files = {}
    for name, (text, names) in hostile_cases(run_config, marker, evil_pickle, one_chain_per_module).items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        files[name] = (str(path), names)
    return marker, files


def _entry_points(tmp_path, capsys):
    """name -> function(config path) -> the text of the refusal (raises if it was accepted)."""
    demo, export_model = load_tool("demo"), load_tool("deploy/export_model")
    convert, analyze = load_tool("convert_official"), load_tool("analyze_model")
    benchmark_export, criterion_memory = load_tool("benchmark_export", "dev"), load_tool("criterion_memory", "dev")
    small_data, quickstart = load_tool("benchmark_small_data", "dev"), load_tool("quickstart")
    image = str(tmp_path / "image.png")  # never read: the config is refused first
    Image.new("RGB", (64, 64)).save(image)
    fresh = (str(tmp_path / f"out{i}") for i in itertools.count())  # a new output folder for every call

    def returned(code):
        assert code not in (0, None), "accepted"
        captured = capsys.readouterr()
        return captured.out + captured.err

    return {
        "train_net": lambda p: train_net.main(train_net.argument_parser().parse_args(["--config-file", p, f"train.output_dir={next(fresh)}"])),
        "train_net --eval-only": lambda p: train_net.main(train_net.argument_parser().parse_args(["--config-file", p, "--eval-only"])),
        "Predictor": lambda p: Predictor(p),
        "demo": lambda p: demo.main(["--config-file", p, "--input", image, "--output", next(fresh)]),
        "export_model": lambda p: export_model.main(["--config-file", p, "--format", "onnx", "--output", next(fresh)]),
        "convert_official": lambda p: returned(convert.main([str(tmp_path / "official.pth"), str(tmp_path / "c.pth"), "--config-file", p])),
        "quickstart": lambda p: returned(quickstart.main(["--config-file", p, "--output-dir", next(fresh), "--data-root", str(tmp_path / "data")])),
        "analyze_model": lambda p: analyze.main(["--config-file", p]),
        "benchmark_export": lambda p: benchmark_export.main(["--config-file", p]),
        "criterion_memory": lambda p: criterion_memory.measure(p, [], (64, 64), 2, 0),
        "benchmark_small_data": lambda p: small_data.load_soit_config({"config": p, "overrides": []}),
    }  # fmt: skip


def _refusal(entry, path):
    try:
        text = entry(path)
    except UnsafeFileError as e:
        return str(e)
    if not isinstance(text, str):
        raise AssertionError(f"{path} was accepted")
    return text


def test_hostile_configs_are_refused_by_every_entry_point(corpus, tmp_path, capsys, monkeypatch):
    marker, files = corpus
    monkeypatch.chdir(tmp_path)  # nothing an entry point might write lands in the checkout
    entries = _entry_points(tmp_path, capsys)
    failures = []
    for case, (path, names) in files.items():
        for entry_name, entry in entries.items():
            try:
                text = _refusal(entry, path)
            except (Exception, SystemExit) as e:  # accepted, or failed for another reason: not a refusal
                failures.append(f"{case} via {entry_name}: {type(e).__name__}: {str(e)[:200]}")
                continue
            opt_in = "--trust-pickle" if case == "proposal_files" else "--trust-config"
            if os.path.basename(path) not in text or names not in text or opt_in not in text:
                failures.append(f"{case} via {entry_name}: the refusal does not name the file, {names!r} and {opt_in}: {text[:300]}")
    assert not failures, "\n".join(failures)
    assert not marker.exists()
    assert len(files) >= 17


def test_proposal_files_load_when_the_user_trusts_pickles(corpus):
    """The refusal is an opt-in, not a ban: with trust_pickle the config loads (detectron2 reads
    the proposals when the dataset is built)."""
    _, files = corpus
    cfg = load_config(files["proposal_files"][0], trust_pickle=True)
    assert list(cfg.dataloader.train.dataset.proposal_files)
    with pytest.raises(UnsafeFileError, match="proposal_files.*--trust-pickle"):
        load_config(QUICKSTART, ["dataloader.train.dataset.proposal_files=[p.pkl]"])  # a .py config too
