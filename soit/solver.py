"""Optimizer parameter groups with learning-rate multipliers chosen by parameter name, and a
length-independent step schedule."""
import bisect
from typing import Dict, List, Optional

import torch
from detectron2.solver.build import reduce_param_groups
from fvcore.common.param_scheduler import ParamScheduler

__all__ = ["get_optimizer_params", "FractionStepScheduler"]

_NORMS = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
)


def get_optimizer_params(
    model: torch.nn.Module,
    base_lr: float,
    weight_decay: float,
    *,
    lr_multipliers: Optional[Dict[str, float]] = None,
    weight_decay_norm: Optional[float] = None,
) -> List[Dict]:
    """Parameter groups as detectron2's ``get_default_optimizer_params`` makes them (each
    trainable parameter once; normalisation layers may get their own weight decay), with
    ``lr = base_lr * m`` for every parameter whose full name contains a key of
    ``lr_multipliers`` (the first matching key wins).

    SOIT's recipe (docs/model.md, section 8): ``{"backbone": 0.1, "sampling_offsets": 0.1}`` and the
    same weight decay everywhere (``weight_decay_norm=None``), as the official release.
    """
    lr_multipliers = dict(lr_multipliers or {})
    matched = {key: 0 for key in lr_multipliers}
    groups, seen = [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{name}" if module_name else name
            lr = base_lr
            for key, mult in lr_multipliers.items():
                if key in full:
                    lr = base_lr * mult
                    matched[key] += 1
                    break
            wd = weight_decay_norm if isinstance(module, _NORMS) and weight_decay_norm is not None else weight_decay
            groups.append({"params": [param], "lr": lr, "weight_decay": wd})
    unused = [k for k, n in matched.items() if n == 0]
    if unused:
        raise ValueError(f"lr_multipliers keys {unused} match no trainable parameter of the model")
    return reduce_param_groups(groups)


class FractionStepScheduler(ParamScheduler):
    """Piecewise-constant multiplier with steps at fractions of the training length, so a
    schedule survives a change of ``train.max_iter`` (e.g. x0.1 for the last 15%:
    ``FractionStepScheduler(values=[1.0, 0.1], fractions=[0.85])``)."""

    def __init__(self, values: List[float], fractions: List[float]):
        if len(values) != len(fractions) + 1:
            raise ValueError(f"need one more value than fractions, got {len(values)} values and {len(fractions)} fractions")
        if list(fractions) != sorted(fractions) or not all(0 < f < 1 for f in fractions):
            raise ValueError(f"fractions must increase strictly inside (0, 1), got {fractions}")
        self._values = list(values)
        self._fractions = list(fractions)

    def __call__(self, where: float) -> float:
        return self._values[bisect.bisect_right(self._fractions, where)]
