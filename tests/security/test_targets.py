"""``_target_`` names are judged by what they resolve to, not by how they are spelt."""
import glob
import importlib
import os
import sys

import pytest
from conftest import REPO
from detectron2.config import LazyConfig
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig

from soit.checkpoint.safe_load import UnsafeFileError
from soit.config import load_config
from soit.config.targets import (
    ALLOWED_CALLABLES,
    ALLOWED_FAMILIES,
    _MODULES,
    TargetRefused,
    canonical_name,
    resolve_target,
)

sys.path.insert(0, os.path.dirname(__file__))
from chains import DANGEROUS, find_chains  # noqa: E402


@pytest.fixture(scope="module")
def chains():
    found = find_chains(_MODULES | {"soit.data.packaged"})
    return [chain for group in found.values() for chain in group], found


def test_generated_chains_reach_dangerous_code_and_are_refused(chains, tmp_path):
    every, found = chains
    reached = {dangerous for (_, dangerous) in found}
    assert {"os", "subprocess", "builtins", "importlib", "pickle", "shutil", "sys"} <= reached
    starts = {start for (start, _) in found}
    assert {"soit.data", "soit.modeling", "torch.nn", "torch.optim", "detectron2.data.transforms"} <= starts
    assert len(every) > 300, len(every)
    dangerous = set()
    for name in DANGEROUS:
        module = importlib.import_module(name)
        dangerous |= {id(getattr(module, attr)) for attr in dir(module)}
    accepted = []
    for chain in every:
        target = locate(chain)  # what detectron2's instantiate would call
        assert callable(target) and id(target) in dangerous, chain
        try:
            resolve_target(chain)
            accepted.append(chain)
        except TargetRefused as e:
            assert chain in str(e)
    assert not accepted, accepted
    # the same through the loader, a sample of them in a whole file each
    for i, chain in enumerate(every[:: max(1, len(every) // 60)]):
        path = tmp_path / f"chain{i}.yaml"
        path.write_text(f"model:\n  _target_: {chain}\n")
        with pytest.raises(UnsafeFileError, match=rf"(?s){path.name}.*{chain}.*--trust-config"):
            load_config(str(path))


def test_every_allowed_entry_resolves_to_itself():
    """No stale name in the allow-list; each family's base is a class."""
    for name in sorted(ALLOWED_CALLABLES):
        obj, canonical = resolve_target(name)
        assert canonical == name, (name, canonical)
    for package, base in ALLOWED_FAMILIES:
        assert isinstance(locate(base), type), base
        assert locate(package) is not None, package


@pytest.mark.parametrize(
    "spelled, canonical",
    [
        ("torch.optim.AdamW", "torch.optim.adamw.AdamW"),
        ("soit.modeling.SOIT", "soit.modeling.meta_arch.SOIT"),
        ("detectron2.data.transforms.RandomFlip", "detectron2.data.transforms.augmentation_impl.RandomFlip"),
        ("torch.nn.ReLU", "torch.nn.modules.activation.ReLU"),
        ("detectron2.modeling.ResNet.make_default_stages", "detectron2.modeling.backbone.resnet.ResNet.make_default_stages"),
    ],
)
def test_aliases_of_allowed_callables_are_accepted(spelled, canonical):
    obj, name = resolve_target(spelled)
    assert name == canonical and obj is locate(spelled) or getattr(obj, "__func__", None) is locate(spelled)


@pytest.mark.parametrize(
    "spelled, why",
    [
        ("torch.nn.Module.load_state_dict", "torch.nn.modules.module.Module.load_state_dict"),  # allowed class, other method
        ("torch.hub.load", "torch.hub"),  # a library's module that holds no allowed callable
        ("torch.load", "torch.serialization.load"),
        ("soit.checkpoint.safe_load.pickle.loads", "pickle"),
        ("detectron2.data.datasets.load_proposals_into_dataset", "load_proposals_into_dataset"),
        ("timm.create_model", "outside the libraries"),
        ("eval", "outside the libraries"),
        ("torch.nn.Module.__subclasses__", "public attributes"),
        ("torch.ops.load_library", "load_library"),
    ],
)
def test_names_that_reach_other_objects_are_refused(spelled, why):
    with pytest.raises(TargetRefused, match=why.replace(".", r"\.")):
        resolve_target(spelled)


def test_refused_names_import_nothing_new():
    """The look-up imports no module outside those holding allowed callables (an import runs code)."""
    assert "antigravity" not in sys.modules and "this" not in sys.modules
    for spelled in ("antigravity.geohash", "this.s", "soit.data.packaged.antigravity.x", "torch.utils.bottleneck.main"):
        with pytest.raises(TargetRefused):
            resolve_target(spelled)
    assert "antigravity" not in sys.modules and "this" not in sys.modules
    assert "torch.utils.bottleneck" not in sys.modules


def _targets(node, found):
    if isinstance(node, DictConfig):
        if "_target_" in node:
            target = node._get_node("_target_")._value()
            found.append(target if isinstance(target, str) else canonical_name(target))
        for key in node.keys():
            _targets(node._get_node(key), found)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            _targets(node._get_node(i), found)
    return found


@pytest.mark.parametrize(
    "config", sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True))
)
def test_every_shipped_config_saved_as_yaml_loads_with_the_same_callables(config, tmp_path):
    """A run folder's config.yaml of any shipped config is accepted, and each of its targets is
    the callable the .py config holds."""
    cfg = LazyConfig.load(os.path.join(REPO, config))
    path = tmp_path / "config.yaml"
    LazyConfig.save(cfg, str(path))
    loaded = load_config(str(path))
    expected = [canonical_name(locate(t)) if isinstance(t, str) else t for t in _targets(cfg, [])]
    assert sorted(_targets(loaded, [])) == sorted(expected)


def test_an_override_cannot_bring_in_a_callable_the_file_could_not(tmp_path):
    cfg = LazyConfig.load(os.path.join(REPO, "configs", "quickstart", "soit_nuclei_cpu.py"))
    path = tmp_path / "config.yaml"
    LazyConfig.save(cfg, str(path))
    with pytest.raises(UnsafeFileError, match="model._target_.*os.system.*--trust-config"):
        load_config(str(path), ["model._target_=os.system"])
    with pytest.raises(UnsafeFileError, match="oc.env"):
        load_config(str(path), ["train.output_dir=${oc.env:HOME}"])
    assert load_config(str(path), ["model.embed_dim=32"]).model.transformer.embed_dim == 32  # references still follow


def test_trusted_configs_are_read_as_detectron2_reads_them(tmp_path):
    path = tmp_path / "trusted.yaml"
    path.write_text("model:\n  _target_: collections.OrderedDict\n  a: 1\n")
    with pytest.raises(UnsafeFileError, match="collections.OrderedDict"):
        load_config(str(path))
    assert load_config(str(path), trust_config=True).model._target_ == "collections.OrderedDict"
