"""Attribute chains from the libraries a YAML config may name to modules that run code.

Found by walking, from every module that holds an allowed callable, the attributes that are
modules or classes (``vars()``, so nothing is imported or computed by the walk), up to a few
hops, and recording each path that reaches one of the dangerous modules or a function
defined in one. Each chain is a ``_target_`` string that detectron2's ``locate`` resolves.
"""
import importlib
import inspect
from collections import deque
from types import ModuleType

DANGEROUS = {
    "os": ("system", "popen", "execv", "remove"),
    "posix": ("system",),
    "subprocess": ("run", "Popen", "check_output"),
    "builtins": ("exec", "eval", "open", "compile"),
    "importlib": ("import_module", "reload"),
    "pickle": ("load", "loads"),
    "shutil": ("rmtree", "copyfile"),
    "sys": ("exit", "settrace"),
}


def _module_of(obj):
    if isinstance(obj, ModuleType):
        return obj.__name__
    if inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj):
        return getattr(obj, "__module__", None)
    return None


def find_chains(start_modules, max_hops=3, per_start=6):
    """{(start module, dangerous module): [chain, ...]}: ``_target_`` strings from each start
    module that reach a dangerous one (a module reached is completed with one of its
    dangerous functions); at most ``per_start`` chains per pair, the shortest first."""
    found = {}
    for start in sorted(start_modules):
        try:
            root = importlib.import_module(start)
        except ImportError:
            continue
        seen = {id(root)}
        queue = deque([(root, start, 0)])
        while queue:
            obj, path, hops = queue.popleft()
            try:
                items = list(vars(obj).items())
            except TypeError:
                continue
            for name, value in items:
                if not isinstance(name, str) or not name.isidentifier() or name.startswith("__"):
                    continue
                chain = f"{path}.{name}"
                module = _module_of(value)
                if isinstance(value, ModuleType) and value.__name__ in DANGEROUS:
                    for function in DANGEROUS[value.__name__]:
                        _add(found.setdefault((start, value.__name__), []), f"{chain}.{function}", per_start)
                    continue
                if module in DANGEROUS and (inspect.isfunction(value) or inspect.isbuiltin(value)):
                    _add(found.setdefault((start, module), []), chain, per_start)
                    continue
                if hops + 1 < max_hops and (isinstance(value, ModuleType) or inspect.isclass(value)):
                    if id(value) not in seen:
                        seen.add(id(value))
                        queue.append((value, chain, hops + 1))
    return found


def _add(chains, chain, limit):
    if len(chains) < limit and chain not in chains:
        chains.append(chain)
