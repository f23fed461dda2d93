"""Nothing outside the two safe modules reads a config, a YAML file or a pickle by itself."""
import ast
import os

from conftest import REPO

# the only modules that may call the readers below
SAFE_MODULES = {"soit/config/loader.py", "soit/checkpoint/safe_load.py"}

# (object, attribute) calls that can run code while reading a user file
UNSAFE_CALLS = {
    ("LazyConfig", "load"), ("LazyConfig", "load_rel"), ("OmegaConf", "load"),
    ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("yaml", "load_all"), ("yaml", "unsafe_load_all"),
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
    ("torch", "load"), ("np", "load"), ("numpy", "load"), ("joblib", "load"),
}  # fmt: skip
# checkpointers whose ``load`` unpickles with torch.load(weights_only=False)
UNSAFE_CHECKPOINTERS = {"DetectionCheckpointer", "Checkpointer"}
# names that, imported on their own (``from pickle import load``), are these readers
UNSAFE_IMPORTS = {(module, name) for module, name in UNSAFE_CALLS} | {("yaml", "Loader"), ("yaml", "UnsafeLoader")}


def python_files():
    for top in ("soit", "tools", "dev"):
        for folder, _, files in os.walk(os.path.join(REPO, top)):
            yield from (os.path.join(folder, f) for f in files if f.endswith(".py"))
    yield os.path.join(REPO, "train_net.py")


def unsafe_uses(path):
    """(line, what) of each call or import of an unsafe reader in one file."""
    tree = ast.parse(open(path).read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in UNSAFE_CALLS:
                found.append((node.lineno, f"{node.value.id}.{node.attr}"))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            if (node.value.attr, node.attr) in UNSAFE_CALLS:  # e.g. detectron2.config.LazyConfig.load
                found.append((node.lineno, f"...{node.value.attr}.{node.attr}"))
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name in UNSAFE_CHECKPOINTERS:
                found.append((node.lineno, f"{name}(...)"))
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if (node.module.split(".")[-1], alias.name) in UNSAFE_IMPORTS:
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
    return found


def test_every_config_and_pickle_reader_goes_through_the_safe_modules():
    offenders = []
    checked = 0
    for path in python_files():
        rel = os.path.relpath(path, REPO).replace(os.sep, "/")
        checked += 1
        if rel in SAFE_MODULES:
            assert unsafe_uses(path), f"{rel} is a safe module but reads nothing: the list is stale"
            continue
        offenders += [f"{rel}:{line}: {what}" for line, what in unsafe_uses(path)]
    assert checked > 40
    assert not offenders, "read user files only through soit.config.load_config / soit.checkpoint.safe_load:\n" + (
        "\n".join(offenders)
    )


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The scanner itself: each form of an unsafe read is caught."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import pickle, torch, yaml\n"
        "from detectron2.config import LazyConfig\n"
        "import detectron2.config\n"
        "from pickle import loads\n"
        "a = LazyConfig.load('x.py')\n"
        "b = detectron2.config.LazyConfig.load('x.py')\n"
        "c = yaml.unsafe_load(open('x'))\n"
        "d = pickle.load(open('x', 'rb'))\n"
        "e = torch.load('x', weights_only=True)\n"
        "f = DetectionCheckpointer(model).load('x.pth')\n"
    )
    found = {what for _, what in unsafe_uses(str(sample))}
    assert found == {
        "LazyConfig.load", "...LazyConfig.load", "yaml.unsafe_load", "pickle.load", "torch.load",
        "from pickle import loads", "DetectionCheckpointer(...)",
    }  # fmt: skip
