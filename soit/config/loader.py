"""Reading a LazyConfig, with the command line's overrides, without running a user file's code.

Every entry point (``train_net.py``, the Predictor, the demo, export, conversion, the quick
start and every tool) reads its config with :func:`load_config`. For a YAML config (a run
folder's ``config.yaml``, a file someone shared), unless the user passes ``--trust-config``:

1. the file is parsed with ``yaml.safe_load``: Python tags (``!!python/...``) are refused;
2. the overrides are applied (a misspelt key fails, as with :func:`apply_overrides`);
3. every string is parsed with OmegaConf's own interpolation grammar, and resolver calls
   (``${oc.create:...}``, ``${oc.decode:...}``, any ``${name:...}``) are refused: they build
   values, ``_target_`` entries included, only when the config is resolved. Plain references
   (``${..embed_dim}``) stay, so an override still reaches every value that refers to it;
4. every ``_target_``, at any depth, must be spelt out (no interpolation) and resolve to an
   allowed callable, checked by identity (:mod:`soit.config.targets`); the string is then
   replaced by the object it resolved to, so what is instantiated later is exactly what was
   checked (as in a ``.py`` config, whose ``LazyCall`` holds the callable itself).

For every config, YAML or Python, arguments that make an allowed callable unpickle a file
(detectron2's ``proposal_files``, timm's checkpoint arguments: ``PICKLE_ARGUMENTS``) are refused
unless the user passes ``--trust-pickle``. A Python (``.py``) config is a program and runs,
as with detectron2.
"""
import logging
import os
from typing import Iterable, Optional

from .targets import PICKLE_ARGUMENTS, TargetRefused, canonical_name, is_allowed, resolve_target

__all__ = ["load_config"]

logger = logging.getLogger(__name__)

_TRUST_CONFIG = "If you trust the file, pass --trust-config (trust_config=True)."


def _unsafe(message):
    from ..checkpoint.safe_load import UnsafeFileError

    return UnsafeFileError(message)


def _read_yaml(path):
    """The YAML file as plain data, Python tags refused."""
    import yaml

    with open(path) as f:
        try:
            plain = yaml.safe_load(f)
        except yaml.constructor.ConstructorError as e:
            raise _unsafe(
                f"{path}: the YAML config holds a Python object tag ({e.problem}, {e.problem_mark}); reading it "
                f"could run code. {_TRUST_CONFIG}"
            ) from e
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not a valid YAML config: {e}") from e
    if not isinstance(plain, dict):
        raise ValueError(f"{path}: a YAML config holds a mapping, this one a {type(plain).__name__}")
    return plain


def _resolver_calls(text):
    """Names of the resolvers a string calls, found with OmegaConf's own grammar."""
    from omegaconf import grammar_parser
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser

    if "${" not in text:
        return []
    tree = grammar_parser.parse(text)
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            found.append(node.resolverName().getText())
        stack.extend(node.getChildren() if hasattr(node, "getChildren") else [])
    return found


def _check_plain(node, path, where="config"):
    """Refuse resolver calls in strings and turn each ``_target_`` into the allowed object it
    names; ``node`` is plain data (dicts, lists, scalars), changed in place."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                if not isinstance(value, str) and is_allowed(value):
                    continue  # resolved and checked when the file was read
                try:
                    node[key], _ = resolve_target(value)
                except TargetRefused as e:
                    raise _unsafe(
                        f"{path}: {where}._target_ {e}; a YAML config may name only the model, data, evaluation and "
                        f"optimisation callables listed in soit/config/targets.py. {_TRUST_CONFIG}"
                    ) from e
            else:
                _check_plain(value, path, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_plain(value, path, f"{where}[{i}]")
    elif isinstance(node, str):
        try:
            calls = _resolver_calls(node)
        except Exception as e:  # OmegaConf would fail on it too when resolving
            raise ValueError(f"{path}: {where} = {node!r} is not a valid interpolation: {e}") from e
        if calls:
            raise _unsafe(
                f"{path}: {where} = {node!r} calls the resolver {calls[0]!r}; a YAML config may refer to its own "
                f"values (${{..key}}) but not call resolvers, which can build callables when resolved. {_TRUST_CONFIG}"
            )


def _check_pickle_arguments(cfg, path):
    """Refuse arguments that make an allowed callable unpickle a file (see ``PICKLE_ARGUMENTS``)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    def visit(node, where):
        if isinstance(node, DictConfig):
            if "_target_" in node:
                target = node._get_node("_target_")._value()
                if isinstance(target, str):  # a .py config may spell one; it is a program and resolves it
                    from detectron2.utils.registry import locate

                    target = locate(target)
                for arg, what in PICKLE_ARGUMENTS.get(canonical_name(target) or "", {}).items():
                    if arg not in node:
                        continue
                    value = OmegaConf.select(node, arg, throw_on_resolution_failure=False)
                    if value is None and node._get_node(arg)._value() is not None:
                        value = node._get_node(arg)._value()  # unresolvable: judge the raw text
                    if value not in (None, False, "", [], ()) and not (hasattr(value, "__len__") and len(value) == 0):
                        raise _unsafe(
                            f"{path}: {where}.{arg} is set ({_short(value)}): {what}, which can run code. If you "
                            "made the file or trust its source, pass --trust-pickle (trust_pickle=True)."
                        )
            for key in node.keys():
                visit(node._get_node(key), f"{where}.{key}")
        elif isinstance(node, ListConfig):
            for i in range(len(node)):
                visit(node._get_node(i), f"{where}[{i}]")

    visit(cfg, "config")


def _short(value):
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=False)
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def load_config(path, overrides: Optional[Iterable[str]] = (), *, trust_config=False, trust_pickle=False):
    """The LazyConfig in ``path`` with ``overrides`` (``key=value`` strings) applied.

    Args:
        path: a ``.py`` config (a program: it runs) or a ``.yaml``/``.yml`` one (read
            without running code unless ``trust_config``; see the module docstring).
        overrides: command-line overrides; a key the config does not have raises
            ``KeyError`` naming it (:func:`soit.engine.overrides.apply_overrides`).
        trust_config: read a YAML config with detectron2's ``LazyConfig.load``
            (``yaml.unsafe_load``, any ``_target_``): trusted files only.
        trust_pickle: allow arguments that make a callable unpickle a file.

    Raises:
        UnsafeFileError: the config would run code (the message names the file, the key
            and the opt-in that lifts the refusal).
    """
    from detectron2.config import LazyConfig
    from omegaconf import OmegaConf

    from ..engine.overrides import apply_overrides

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    overrides = list(overrides or ())
    if path.endswith((".yaml", ".yml")) and not trust_config:
        plain = _read_yaml(path)
        _check_plain(plain, path)  # before anything reads a value of the file
        cfg = apply_overrides(OmegaConf.create(plain, flags={"allow_objects": True}), overrides)
        plain = OmegaConf.to_container(cfg, resolve=False)
        _check_plain(plain, path)  # what the overrides added
        cfg = OmegaConf.create(plain, flags={"allow_objects": True})
    else:
        if not path.endswith((".py", ".yaml", ".yml")):
            raise ValueError(f"{path}: a config is a .py or .yaml file")
        cfg = apply_overrides(LazyConfig.load(path), overrides)
    if not trust_pickle:
        _check_pickle_arguments(cfg, path)
    return cfg
