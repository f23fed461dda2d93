"""The callables an untrusted YAML config may name as ``_target_``, checked by identity.

A ``_target_`` string is a path of attribute look-ups, and attributes lead anywhere: a module
that imports ``subprocess`` makes ``that.module.subprocess.run`` a valid path, and
``torch.nn.functional.torch.os.system`` is one too. So a name is never judged by how it is
spelt: :func:`resolve_target` follows the path (importing only modules that an allowed
callable lives in, so no other module's import-time code runs), and the object it reaches
is admitted only if it *is* an allowed callable, that is if its canonical name
(``__module__`` + ``__qualname__``) is an allowed entry and that canonical name looks up the
very same object. An alias of an allowed callable (``torch.optim.AdamW`` for
``torch.optim.adamw.AdamW``) is accepted because it reaches the same object; an allowed-looking
path that reaches anything else is refused.

What is allowed (everything the shipped configs use, and the same kinds of objects from the
same libraries):

* :data:`ALLOWED_CALLABLES`: named functions and classes, by canonical name;
* :data:`ALLOWED_FAMILIES`: classes defined under a package that derive from a base class
  there (model layers, augmentations, samplers, evaluators, optimisers, LR schedules).

Some allowed callables read a pickle when given certain arguments (detectron2 unpickles
``proposal_files``; timm reads checkpoints itself). :data:`PICKLE_ARGUMENTS` names them;
:mod:`soit.config.loader` refuses those values unless the user trusts pickles.
"""
import importlib
import inspect
from types import ModuleType
from typing import Dict, Optional, Tuple

__all__ = [
    "ALLOWED_CALLABLES",
    "ALLOWED_FAMILIES",
    "PICKLE_ARGUMENTS",
    "TargetRefused",
    "canonical_name",
    "is_allowed",
    "resolve_target",
]

ALLOWED_CALLABLES = frozenset({
    # detectron2: data loading, model building blocks, optimisation, evaluation
    "detectron2.data.build.build_detection_train_loader",
    "detectron2.data.build.build_detection_test_loader",
    "detectron2.data.build.get_detection_dataset_dicts",
    "detectron2.data.common.DatasetFromList",
    "detectron2.data.common.MapDataset",
    "detectron2.data.dataset_mapper.DatasetMapper",
    "detectron2.layers.shape_spec.ShapeSpec",
    "detectron2.modeling.backbone.resnet.ResNet.make_default_stages",
    "detectron2.modeling.backbone.resnet.ResNet.make_stage",
    "detectron2.solver.build.get_default_optimizer_params",
    "detectron2.solver.lr_scheduler.LRMultiplier",
    "detectron2.solver.lr_scheduler.WarmupParamScheduler",
    # soit: what is not a layer, augmentation or schedule (those are families below)
    "soit.data.augmentation.detr_augmentations",
    "soit.data.augmentation.detr_test_augmentation",
    "soit.data.dataset_mapper.SOITDatasetMapper",
    "soit.solver.get_optimizer_params",
})  # fmt: skip

# (package, base class): classes whose canonical module lies in ``package`` and derive from ``base``
ALLOWED_FAMILIES = (
    ("soit.modeling", "torch.nn.modules.module.Module"),
    ("soit.layers", "torch.nn.modules.module.Module"),
    ("soit.data", "detectron2.data.transforms.augmentation.Augmentation"),
    ("soit.solver", "fvcore.common.param_scheduler.ParamScheduler"),
    ("detectron2.modeling", "torch.nn.modules.module.Module"),
    ("detectron2.layers", "torch.nn.modules.module.Module"),
    ("detectron2.data.transforms", "detectron2.data.transforms.augmentation.Augmentation"),
    ("detectron2.data.samplers", "torch.utils.data.sampler.Sampler"),
    ("detectron2.evaluation", "detectron2.evaluation.evaluator.DatasetEvaluator"),
    ("fvcore.common.param_scheduler", "fvcore.common.param_scheduler.ParamScheduler"),
    ("torch.nn", "torch.nn.modules.module.Module"),
    ("torch.optim", "torch.optim.optimizer.Optimizer"),
    ("torch.optim.lr_scheduler", "torch.optim.lr_scheduler.LRScheduler"),
    ("torchvision.ops", "torch.nn.modules.module.Module"),
)

# canonical name -> {argument: what the callable does with it}; a value other than None,
# False or empty makes the callable unpickle a file
PICKLE_ARGUMENTS: Dict[str, Dict[str, str]] = {
    "detectron2.data.build.get_detection_dataset_dicts": {
        "proposal_files": "detectron2 unpickles each proposal file (pickle.load)",
    },
    "soit.modeling.backbone.timm_backbone.TimmBackbone": {
        "pretrained": "timm reads pretrained weights from its hub or a local file with its own loader",
        "checkpoint_path": "timm reads this checkpoint with its own loader",
        "pretrained_cfg": "timm reads the weights file this names with its own loader",
        "pretrained_cfg_overlay": "timm reads the weights file this names with its own loader",
    },
}


class TargetRefused(ValueError):
    """A ``_target_`` that does not resolve to an allowed callable (the message says why)."""


def _allowed_modules():
    """Module names under which an allowed callable may live (imports stay inside them)."""
    names = {name.rsplit(".", 1)[0] for name in ALLOWED_CALLABLES} | {package for package, _ in ALLOWED_FAMILIES}
    names |= {base.rsplit(".", 1)[0] for _, base in ALLOWED_FAMILIES}
    return frozenset(names)


_MODULES = _allowed_modules()


def _may_import(module_name: str) -> bool:
    """A module on the way to, or inside, a module that holds allowed callables."""
    return any(
        allowed == module_name or allowed.startswith(module_name + ".") or module_name.startswith(allowed + ".")
        for allowed in _MODULES
    )


def _step(obj, part: str, spelled: str):
    """``obj.part``, importing ``part`` as a submodule of a module only where allowed."""
    if isinstance(obj, ModuleType):
        try:
            return getattr(obj, part)
        except AttributeError:
            pass
        child = f"{obj.__name__}.{part}"
        if not _may_import(child):
            raise TargetRefused(f"{spelled!r} leads to the module {child}, which holds no allowed callable")
        try:
            return importlib.import_module(child)
        except ImportError as e:
            raise TargetRefused(f"{spelled!r} does not resolve: {obj.__name__} has no attribute or module {part!r}") from e
    try:
        return inspect.getattr_static(obj, part) if inspect.isclass(obj) and _is_descriptor(obj, part) else getattr(obj, part)
    except AttributeError as e:
        raise TargetRefused(f"{spelled!r} does not resolve: {_describe(obj)} has no attribute {part!r}") from e


def _is_descriptor(cls, part):
    """A property on a class: reading it through ``getattr`` would run its getter."""
    try:
        return isinstance(inspect.getattr_static(cls, part), property)
    except AttributeError:
        return False


def _lookup(dotted: str):
    """The object a canonical dotted name names, importing only allowed modules; None if none."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        if not _may_import(module_name):
            continue
        try:
            obj = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            for part in parts[cut:]:
                obj = inspect.getattr_static(obj, part) if inspect.isclass(obj) else getattr(obj, part)
        except AttributeError:
            return None
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        return obj
    return None


def canonical_name(obj) -> Optional[str]:
    """``module.qualname`` of a Python class or function (None for anything else)."""
    if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismethod(obj)):
        return None
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    return f"{module}.{qualname}"


def _same(a, b) -> bool:
    func = getattr(a, "__func__", a)
    return a is b or func is b or func is getattr(b, "__func__", b)


def is_allowed(obj) -> bool:
    """Whether ``obj`` is one of the allowed callables (by identity, see the module docstring)."""
    name = canonical_name(obj)
    if name is None or not _same(obj, _lookup(name)):
        return False
    if name in ALLOWED_CALLABLES:
        return True
    for package, base in ALLOWED_FAMILIES:
        if inspect.isclass(obj) and name.startswith(package + "."):
            base_class = _lookup(base)
            if inspect.isclass(base_class) and issubclass(obj, base_class):
                return True
    return False


def _describe(obj) -> str:
    name = canonical_name(obj)
    if name:
        return name
    if isinstance(obj, ModuleType):
        return f"the module {obj.__name__}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__} object"


def resolve_target(spelled) -> Tuple[object, str]:
    """The allowed callable a ``_target_`` string names, and its canonical name.

    Raises :class:`TargetRefused` when the string is not a dotted name, would import a
    module outside the allowed libraries, or reaches an object that is not an allowed
    callable (the message names what it reached)."""
    if not isinstance(spelled, str):
        raise TargetRefused(f"{spelled!r} is a {type(spelled).__name__}, expected a dotted name")
    if "${" in spelled:
        raise TargetRefused(f"{spelled!r} is an interpolation: a _target_ must be spelt out")
    parts = spelled.split(".")
    if not all(p.isidentifier() and not p.startswith("__") for p in parts):
        raise TargetRefused(f"{spelled!r} is not a dotted name of public attributes")
    if not _may_import(parts[0]):
        raise TargetRefused(f"{spelled!r} is outside the libraries a YAML config may name")
    obj = importlib.import_module(parts[0])
    for part in parts[1:]:
        obj = _step(obj, part, spelled)
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if not is_allowed(obj):
        raise TargetRefused(f"{spelled!r} resolves to {_describe(obj)}, which is not an allowed callable")
    return obj, canonical_name(obj)
