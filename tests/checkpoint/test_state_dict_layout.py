"""Checkpoints keep loading: the models the shipped configs build have the parameter names and
shapes recorded in ``layouts/state_dict_layouts.json`` (written from the code as it was before
the model's files were reorganised), so a checkpoint saved then loads now with no missing or
unexpected key."""
import json
import os

import pytest
import torch
from conftest import REPO
from detectron2.config import instantiate

from soit.config import load_config

with open(os.path.join(os.path.dirname(__file__), "layouts", "state_dict_layouts.json")) as f:
    LAYOUTS = json.load(f)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_a_checkpoint_of_the_recorded_layout_loads_strictly(name):
    layout = LAYOUTS[name]
    model = instantiate(load_config(os.path.join(REPO, layout["config"]), layout["overrides"]).model)
    # a checkpoint of the recorded layout (values do not matter for the names and shapes)
    saved = {key: torch.zeros(shape) for key, shape in layout["state_dict"].items()}
    result = model.load_state_dict(saved, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, (result.missing_keys, result.unexpected_keys)
    now = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert now == layout["state_dict"]
