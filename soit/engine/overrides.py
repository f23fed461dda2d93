"""``key=value`` config overrides that cannot be silently ignored."""
import difflib

from detectron2.config import LazyConfig
from omegaconf import DictConfig, ListConfig

__all__ = ["apply_overrides"]


def apply_overrides(cfg, overrides):
    """``LazyConfig.apply_overrides`` that refuses a key the config does not have.

    A new key is accepted only inside a ``LazyCall`` (a node with ``_target_``), where it
    becomes an argument of the callable (``model.tile_size=256`` on a config that does not
    set it) and a wrong name fails when the callable is built. Anywhere else (``train.*``,
    ``dataloader.*`` plain values) nothing would ever read it: a misspelt
    ``train.max_iters=2`` raises ``KeyError`` naming the key and the closest existing ones."""
    overrides = list(overrides)
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ValueError(f"config override {item!r} is not key=value")
        node, parts = cfg, key.split(".")
        for depth, part in enumerate(parts):
            where = ".".join(parts[:depth]) or "the config"
            if isinstance(node, ListConfig):
                if not (part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node)):
                    raise KeyError(f"config override {item!r}: {where} is a list of {len(node)}, {part!r} is no index")
                node = node[int(part)]
                continue
            if not isinstance(node, (DictConfig, dict)):
                raise KeyError(f"config override {item!r}: {where} is a {type(node).__name__}, it has no key {part!r}")
            if part not in node:
                if "_target_" in node and depth == len(parts) - 1:
                    break  # a new argument of a LazyCall
                close = difflib.get_close_matches(part, [str(k) for k in node.keys()], n=3)
                hint = f" (did you mean {', '.join('.'.join([*parts[:depth], c]) for c in close)}?)" if close else ""
                raise KeyError(f"config override {item!r}: {where} has no key {part!r}{hint}")
            node = node[part]
    return LazyConfig.apply_overrides(cfg, overrides)
