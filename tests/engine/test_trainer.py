"""SOITTrainer: mixed precision (fp16 with loss scaling, bf16) and gradient clipping."""

import pytest
import torch
from detectron2.utils.events import EventStorage

from conftest import tiny_model, two_images

from soit.engine import SOITTrainer


def _loader():
    while True:
        yield two_images()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_steps_in_each_precision(precision):
    torch.manual_seed(0)
    model = tiny_model(**{"transformer.dropout": 0.0, "mask_encoder.dropout": 0.0}).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    trainer = SOITTrainer(model, _loader(), optimizer, precision=precision, clip_grad_norm=0.1)
    assert (trainer.grad_scaler is not None) == (precision == "fp16")
    with EventStorage(0) as storage:
        trainer.storage = storage
        for trainer.iter in range(2):
            trainer.run_step()
            storage.step()
        losses = storage.latest()
    assert all(torch.isfinite(torch.tensor(v[0])) for k, v in losses.items() if k.startswith("loss"))
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.dtype.is_floating_point)
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    if precision == "fp16":
        # steps whose scaled gradients overflow are skipped and the scale shrinks: never NaN weights
        assert "grad_scaler" in trainer.state_dict()
        assert changed or trainer.grad_scaler.get_scale() < 2.0**16
    else:
        assert 0 < losses["grad_norm"][0] < float("inf")
        assert changed, "no weight moved"


def test_unknown_precision_is_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match="precision"):
        SOITTrainer(model, _loader(), torch.optim.SGD(model.parameters(), lr=0.1), precision="int8")
