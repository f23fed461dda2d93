"""SOIT's configs, from an installed package as from a checkout.

Like detectron2's ``model_zoo``: a wheel or a regular ``pip install .`` ships the
repository's ``configs/`` folder inside this package (``soit/model_zoo/configs``); an
editable install or a checkout on ``PYTHONPATH`` reads the repository's own ``configs/``.

    from soit.model_zoo import get_config
    cfg = get_config("soit_r50_50ep.py")            # a LazyConfig (omegaconf DictConfig)
    cfg = get_config("models/soit_r50.py").model    # one model
"""
import os

__all__ = ["get_config", "get_config_file", "configs_root"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def configs_root() -> str:
    """The folder holding the configs: the packaged copy, else the checkout's ``configs/``."""
    for root in (os.path.join(_HERE, "configs"), os.path.join(os.path.dirname(os.path.dirname(_HERE)), "configs")):
        if os.path.isfile(os.path.join(root, "models", "soit_r50.py")):
            return root
    raise FileNotFoundError(
        f"no SOIT configs next to {_HERE}: the package was installed without them (build it from the "
        "repository with setup.py, which copies configs/ into soit/model_zoo/configs)"
    )


def get_config_file(config_path: str) -> str:
    """The full path of a config relative to the configs folder, e.g. "soit_r50_50ep.py"
    or "models/soit_tiny.py"; a missing one raises ``FileNotFoundError`` listing the others."""
    root = configs_root()
    path = os.path.normpath(os.path.join(root, config_path))
    if not path.startswith(root + os.sep) or not os.path.isfile(path):
        available = sorted(
            os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files if f.endswith(".py")
        )
        raise FileNotFoundError(f"{config_path!r} is not a SOIT config; available: {', '.join(available)}")
    return path


def get_config(config_path: str):
    """The LazyConfig of ``config_path`` (see :func:`get_config_file`). Configs are Python
    files of this package: they run when loaded, as with detectron2."""
    from ..config import load_config

    return load_config(get_config_file(config_path))
