"""Reading checkpoints without running code.

A pickle can call any Python function while it is read. Run folders are shared with their
checkpoints, so every entry point of this project reads them with the functions below
(configs: :func:`soit.config.load_config`):

* checkpoints (``.pth``, ``.pkl``, ``.pyth``, any extension): ``torch.load(weights_only=True)``
  or, for detectron2/Caffe2 ``.pkl`` files, an unpickler that admits only plain containers,
  numbers, strings and numpy arrays. ``trust_pickle=True`` (``--trust-pickle`` on the command
  lines) reads a file the user trusts with full unpickling.
"""
import io
import logging
import os
import pickle
import re

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = [
    "IncompleteCheckpointError",
    "UnsafeFileError",
    "SafeCheckpointer",
    "load_checkpoint_file",
    "restricted_pickle_load",
    "torch_load_checked",
]

logger = logging.getLogger(__name__)

# (module, name) pairs a pickle of weights needs: numpy arrays and scalars, ordered dicts.
# ``_codecs.encode`` turns the latin-1 strings of protocol-2 numpy pickles back into bytes.
_PICKLE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")),
    *((m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")),
}

class UnsafeFileError(ValueError):
    """A user file would need code execution to be read."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path, **kwargs):
        super().__init__(file, **kwargs)
        self._path = path

    def find_class(self, module, name):
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeFileError(
            f"{self._path}: the pickle asks for {module}.{name}, which a checkpoint of weights does not "
            "need; reading it could run code. If you made the file or trust its source, pass "
            "--trust-pickle (trust_pickle=True) to read it with full unpickling."
        )


def restricted_pickle_load(f, path="<file>"):
    """Unpickle ``f`` (a binary file object) admitting only containers, numbers, strings and
    numpy arrays; anything else raises :class:`UnsafeFileError` naming ``path``."""
    return _RestrictedUnpickler(f, path, encoding="latin1").load()


def _trust_hint(path, reason):
    return UnsafeFileError(
        f"{path}: {reason}; reading it could run code. If you made the file or trust its source, "
        "pass --trust-pickle (trust_pickle=True) to read it with full unpickling."
    )


def torch_load_checked(path, trust_pickle=False, mmap=False):
    """``torch.load`` that runs no code unless ``trust_pickle`` and names ``path`` in every error
    (``mmap``: map the tensors' storage instead of reading it, for a quick look)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from e
    except Exception as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found and not trust_pickle:
            # a real pickle that asks for a Python object torch's weights-only reader refuses
            raise _trust_hint(path, f"it holds a Python object ({found.group(1)}), not only tensors and plain values") from e
        raise ValueError(f"{path} is not a readable checkpoint (truncated, or not a PyTorch file): {_first_line(e)}") from e


def _first_line(e):
    text = str(e)
    if "WeightsUnpickler error:" in text:  # skip torch's generic preamble
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def load_checkpoint_file(path, trust_pickle=False):
    """A checkpoint as the dict detectron2's checkpointer expects (``{"model": {...}, ...}``).

    ``.pkl``: detectron2 model-zoo (``{"model": ..., "__author__": ...}``) or Caffe2 format;
    ``.pyth``: pycls (``{"model_state": ...}``); anything else: ``torch.save`` output.
    Without ``trust_pickle`` nothing in the file can run code: a file that needs it raises
    :class:`UnsafeFileError` naming the file and the opt-in."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            if trust_pickle:
                data = pickle.loads(raw, encoding="latin1")
            else:
                data = restricted_pickle_load(io.BytesIO(raw), path)
        except UnsafeFileError:
            raise
        except Exception as e:
            raise ValueError(f"{path} is not a readable .pkl checkpoint (truncated, or not a pickle): {_first_line(e)}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a .pkl checkpoint holds a dict, this one a {type(data).__name__}")
        if "model" in data and "__author__" in data:  # detectron2 model-zoo format
            return data
        if "blobs" in data:  # Caffe2 detection models
            data = data["blobs"]
        weights = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}
    data = torch_load_checked(path, trust_pickle)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a checkpoint holds a dict of weights, this one a {type(data).__name__}")
    if path.endswith(".pyth"):  # pycls
        if "model_state" not in data:
            raise ValueError(f"{path}: a pycls (.pyth) checkpoint holds 'model_state', this one {sorted(data)[:5]}")
        state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
        return {"model": state, "__author__": "pycls", "matching_heuristics": True}
    return data if "model" in data else {"model": data}


class SafeCheckpointer(DetectionCheckpointer):
    """detectron2's ``DetectionCheckpointer`` reading files with :func:`load_checkpoint_file`:
    no code runs while a checkpoint is read unless ``trust_pickle=True``.

    With ``complete=True`` (inference: evaluation, the Predictor, the demo, export) a
    checkpoint must set every weight of the model: a missing weight or one of another shape
    (e.g. another number of classes) raises :class:`IncompleteCheckpointError` instead of
    leaving random weights behind a warning. Training leaves it off: initialising from a
    backbone-only file is normal there."""

    def __init__(self, model, save_dir="", *, trust_pickle=False, complete=False, save_to_disk=None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.trust_pickle = trust_pickle
        self.complete = complete
        self._path = None
        target = getattr(model, "module", model)
        if hasattr(target, "set_training_scale") and "training_scale" not in self.checkpointables:
            # what the model was trained on travels with its weights (soit.modeling.object_scale)
            self.checkpointables["training_scale"] = _TrainingScaleEntry(target, self)

    def _load_file(self, filename):
        self._path = filename
        return load_checkpoint_file(filename, trust_pickle=self.trust_pickle)

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        if self.complete and incompatible is not None:
            _check_complete(self.model, incompatible, self._path)
        return incompatible


class _TrainingScaleEntry:
    """The checkpoint entry "training_scale": the model's record of its training inputs, as
    plain numbers (read back with weights-only loading)."""

    def __init__(self, model, checkpointer):
        self.model, self.checkpointer = model, checkpointer

    def state_dict(self):
        scale = self.model.training_scale
        return scale.to_dict() if scale is not None else {}

    def load_state_dict(self, state):
        if state:
            self.model.set_training_scale(state, f"checkpoint {self.checkpointer._path}")


class IncompleteCheckpointError(ValueError):
    """A checkpoint that would leave weights of the model at their random initialisation."""


def _check_complete(model, incompatible, path):
    weights = dict(model.named_parameters())
    if incompatible.incorrect_shapes:
        key, found, expected = incompatible.incorrect_shapes[0]
        hint = ""
        if "cls_branches" in key or "class_embed" in key:
            hint = f"; the checkpoint's classifier has {found[0]} outputs: add the override model.num_classes={found[0]}"
        raise IncompleteCheckpointError(
            f"{path}: {len(incompatible.incorrect_shapes)} weights do not fit the model, e.g. {key} is {tuple(found)} "
            f"in the checkpoint and {tuple(expected)} in the model{hint}. Evaluating or exporting with them left "
            "at random would give meaningless results."
        )
    missing = [k for k in incompatible.missing_keys if k in weights]
    if missing:
        count = sum(weights[k].numel() for k in missing)
        total = sum(w.numel() for w in weights.values())
        raise IncompleteCheckpointError(
            f"{path} does not set {len(missing)} of the model's {len(weights)} weight tensors ({count:,} of {total:,} "
            f"parameters), e.g. {', '.join(missing[:3])}: it is not a checkpoint of this model and config. "
            "Evaluating or exporting with those weights at random would give meaningless results."
        )
