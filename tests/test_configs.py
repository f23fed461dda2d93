"""Every config loads, builds its model and names registered data; ablations change only
what their names say."""
import glob
import os

import pytest
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator
from omegaconf import DictConfig, ListConfig, OmegaConf

from conftest import REPO
from soit.modeling import SOIT

CONFIGS = os.path.join(REPO, "configs")
EXPERIMENTS = sorted(
    glob.glob(os.path.join(CONFIGS, "*.py"))
    + glob.glob(os.path.join(CONFIGS, "ablations", "*.py"))
    + glob.glob(os.path.join(CONFIGS, "quickstart", "*.py"))
)
MODELS = sorted(glob.glob(os.path.join(CONFIGS, "models", "*.py")))


def flatten(node, prefix=""):
    """Config values by dotted path, interpolations left unresolved (a derived value such as
    the mask encoder's channels follows its source and is not a change of its own)."""
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)
    out = {}
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (dict, list)):
            out.update(flatten(value, path))
        else:
            out[path] = value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
    return out


def load(rel):
    return LazyConfig.load(os.path.join(CONFIGS, rel))


@pytest.mark.parametrize("path", MODELS, ids=os.path.basename)
def test_model_configs_build(path):
    model = instantiate(LazyConfig.load(path).model)
    assert isinstance(model, SOIT)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_experiment_configs_build_and_name_registered_data(path):
    cfg = LazyConfig.load(path)
    assert {"model", "dataloader", "optimizer", "lr_multiplier", "train"} <= set(cfg.keys())
    registered = set(DatasetCatalog.list())
    for split in ("train", "test"):
        names = cfg.dataloader[split].dataset.names
        for name in [names] if isinstance(names, str) else names:
            assert name in registered, f"{path}: dataset {name!r} is not registered"
    assert cfg.dataloader.evaluator._target_ is COCOEvaluator
    assert cfg.dataloader.evaluator.dataset_name in registered
    assert cfg.dataloader.train.mapper.image_format == cfg.model.input_format
    if "ablations" not in path:  # ablations build the same classes; their diffs are checked below
        model = instantiate(cfg.model)
        assert isinstance(model, SOIT)


# file -> exactly the values it changes with respect to its base
ABLATIONS = {
    "ablations/base.py": ("soit_r50_50ep.py", {"model.criterion.mask_loss_layers": 1, "model.mask_head.pos_encoding": "absolute"}),
    "ablations/heads_1.py": ("ablations/base.py", {"model.mask_head.num_heads": 1}),
    "ablations/heads_2.py": ("ablations/base.py", {"model.mask_head.num_heads": 2}),
    "ablations/heads_8.py": ("ablations/base.py", {"model.mask_head.num_heads": 8}),
    "ablations/mask_channels_4.py": ("ablations/base.py", {"model.mask_head.mask_channels": 4}),
    "ablations/mask_channels_16.py": ("ablations/base.py", {"model.mask_head.mask_channels": 16}),
    "ablations/mask_encoder_layers_0.py": ("ablations/base.py", {"model.mask_encoder.num_layers": 0}),
    "ablations/mask_encoder_layers_2.py": ("ablations/base.py", {"model.mask_encoder.num_layers": 2}),
    "ablations/pos_encoding_none.py": ("ablations/base.py", {"model.mask_head.pos_encoding": "none"}),
    "ablations/pos_encoding_relative.py": ("ablations/base.py", {"model.mask_head.pos_encoding": "relative"}),
    **{
        f"ablations/mask_loss_stages_{k}.py": ("soit_r50_50ep.py", {"model.criterion.mask_loss_layers": k})
        for k in range(6)
    },
}


def test_every_ablation_is_listed():
    files = {os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, "ablations", "*.py"))}
    assert files == set(ABLATIONS)


@pytest.mark.parametrize("rel", sorted(ABLATIONS))
def test_ablation_changes_only_its_knob(rel):
    base_rel, expected = ABLATIONS[rel]
    cfg, base = flatten(load(rel)), flatten(load(base_rel))
    changed = {k: cfg.get(k) for k in set(cfg) | set(base) if cfg.get(k) != base.get(k)}
    assert changed == expected


@pytest.mark.parametrize("rel", ["ablations/heads_8.py", "ablations/mask_channels_16.py", "ablations/mask_channels_4.py"])
def test_ablation_models_derive_the_dynamic_parameter_count(rel):
    cfg = load(rel)
    head = instantiate(cfg.model.mask_head)
    m, c, k = head.num_heads, head.mask_channels, head.num_points
    assert head.num_dynamic_params == (m * k * 2 + m * k) * (c + 1) + c + 1


OPTIONS_ON = {
    "model.transformer.mixed_query_selection": True,
    "model.transformer.look_forward_twice": True,
    "model.criterion.cls_loss": "ia_bce",
}


def _changes(rel, base_rel):
    cfg, base = flatten(load(rel)), flatten(load(base_rel))
    return {k: cfg.get(k) for k in set(cfg) | set(base) if cfg.get(k) != base.get(k)}


def test_12_epoch_recipe_is_the_paper_model_with_the_winning_options():
    changed = _changes("soit_r50_12ep.py", "soit_r50_50ep.py")
    schedule = {k: v for k, v in changed.items() if k.startswith(("train.", "lr_multiplier."))}
    assert {k: v for k, v in changed.items() if k not in schedule} == OPTIONS_ON
    assert load("soit_r50_12ep.py").train.max_iter == 44_358  # 12 x 118,287 / 32, rounded


def test_quickstart_paper_config_is_the_quickstart_without_the_options():
    assert _changes("quickstart/soit_nuclei_cpu_paper.py", "quickstart/soit_nuclei_cpu.py") == {
        "model.transformer.mixed_query_selection": False,
        "model.transformer.look_forward_twice": False,
        "model.criterion.cls_loss": "focal",
    }
    # and the paper configs keep the paper's training
    for rel in ["soit_r50_50ep.py", "quickstart/soit_nuclei_cpu_paper.py"]:
        cfg = load(rel)
        assert not cfg.model.transformer.mixed_query_selection and not cfg.model.transformer.look_forward_twice
        assert cfg.model.criterion.cls_loss == "focal" and cfg.model.denoising is None


def test_coco_augmentation_overrides_from_the_command_line():
    from detectron2.data import transforms as T

    from soit.engine.overrides import apply_overrides

    cfg = apply_overrides(
        load("soit_r50_50ep.py"),
        ["dataloader.train.mapper.augmentation.1.max_size=1000", "dataloader.train.mapper.augmentation.0.prob=0.25"],
    )
    resize = instantiate(cfg.dataloader.train.mapper.augmentation[1])
    assert isinstance(resize, T.ResizeShortestEdge) and resize.max_size == 1000
    # the crop branch's flip follows the first list's probability (an interpolation)
    assert instantiate(cfg.dataloader.train.mapper.augmentation_with_crop[0]).prob == 0.25
