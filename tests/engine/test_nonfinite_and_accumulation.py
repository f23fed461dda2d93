"""SOITTrainer: gradient accumulation equals a larger batch; a non-finite loss or gradient
skips the step (weights, optimizer state and EMA unchanged, the terms and images logged) and
too many in a row stop train_net.py with a non-zero exit, the checkpoints intact."""
import logging
import os

import pytest
import torch
from detectron2.utils.events import EventStorage

from conftest import run, synthetic_sample, tiny_model
from test_train_net import blobs, make_cfg  # noqa: F401  (blobs is a fixture)

from soit.engine import SOITTrainer
from soit.engine import training as train_net
from soit.engine.hooks import ModelEMA

NAN = float("nan")


def _same_size_pair():
    """Two images of one size with two objects each: a batch of both has no padding, and the
    losses' normalisation by the number of objects is the same per image and per batch."""
    a = synthetic_sample(96, 96, [(0, 30, 35, 18, 22, (220, 60, 60)), (1, 68, 62, 16, 24, (60, 200, 90))])
    b = synthetic_sample(96, 96, [(1, 28, 60, 16, 26, (80, 80, 230)), (0, 58, 30, 17, 15, (230, 220, 60))])
    for i, d in enumerate((a, b)):
        d["file_name"] = f"image_{i}.png"
    return a, b


def _batches(batches):
    while True:
        yield from batches


def _gradients(batches, grad_accum_steps):
    torch.manual_seed(0)
    # frozen batch norms: BatchNorm's training statistics are per micro-batch, as with any
    # accumulation, so only a network without them can equal the larger batch exactly
    frozen = {"backbone.stem.norm": "FrozenBN", "backbone.stages.norm": "FrozenBN"}
    model = tiny_model(**{"transformer.dropout": 0.0, "mask_encoder.dropout": 0.0, **frozen}).train()
    trainer = SOITTrainer(model, _batches(batches), torch.optim.SGD(model.parameters(), lr=0.0), grad_accum_steps=grad_accum_steps)
    with EventStorage(0) as trainer.storage:
        trainer.run_step()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_two_micro_batches_of_one_equal_one_batch_of_two():
    a, b = _same_size_pair()
    accumulated = _gradients([[a], [b]], grad_accum_steps=2)
    whole = _gradients([[a, b]], grad_accum_steps=1)
    assert accumulated.keys() == whole.keys() and len(whole) > 50
    for name, g in whole.items():
        scale = g.abs().max().clamp_min(1e-8)
        assert (accumulated[name] - g).abs().max() / scale < 1e-4, name


def test_accumulation_is_one_optimizer_step_per_iteration():
    a, b = _same_size_pair()
    model = tiny_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    trainer = SOITTrainer(model, _batches([[a], [b]]), optimizer, grad_accum_steps=2)
    with EventStorage(0) as trainer.storage:
        trainer.run_step()
    steps = {int(s["step"]) for s in optimizer.state.values()}
    assert steps == {1}


def test_settings_are_checked():
    model = tiny_model()
    for bad in ({"grad_accum_steps": 0}, {"grad_accum_steps": 1.5}, {"max_nonfinite_steps": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SOITTrainer(model, iter([]), torch.optim.SGD(model.parameters(), lr=0.1), **bad)


class Injector:
    """Makes chosen iterations non-finite: a NaN in one loss term (``loss_iters``) or in the
    gradient of one parameter (``grad_iters``)."""

    def __init__(self, trainer, term="loss_giou", loss_iters=(), grad_iters=()):
        self.trainer, self.term, self.loss_iters, self.grad_iters = trainer, term, set(loss_iters), set(grad_iters)
        model = trainer.model
        model.register_forward_hook(self.loss_hook)
        self.param_name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
        param.register_hook(lambda g: g * NAN if self.trainer.iter in self.grad_iters else g)

    def loss_hook(self, module, inputs, output):
        if self.trainer.iter in self.loss_iters:
            return {**output, self.term: output[self.term] * NAN}
        return output


def _state(model, optimizer, ema):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {k: {n: t.clone() for n, t in s.items() if torch.is_tensor(t)} for k, s in optimizer.state.items()},
        {k: v.clone() for k, v in ema.shadow.state_dict().items()},
    )


def _assert_same(before, after):
    for b, a in zip(before, after):
        assert b.keys() == a.keys()
        for k in b:
            if isinstance(b[k], dict):
                assert all(torch.equal(b[k][n], a[k][n]) for n in b[k]), k
            else:
                assert torch.equal(b[k], a[k]), k


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_nan_loss_term_or_gradient_mid_run_skips_that_step_only(precision, caplog):
    a, b = _same_size_pair()
    torch.manual_seed(0)
    model = tiny_model(**{"transformer.dropout": 0.0, "mask_encoder.dropout": 0.0}).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    trainer = SOITTrainer(model, _batches([[a, b]]), optimizer, precision=precision, max_nonfinite_steps=3)
    ema = ModelEMA(model, decay=0.9)
    ema.trainer = trainer
    inject = Injector(trainer, loss_iters={1}, grad_iters={3})
    caplog.set_level(logging.WARNING, logger="soit")
    with EventStorage(0) as trainer.storage:
        for trainer.iter in range(5):
            before = _state(model, optimizer, ema)
            trainer.run_step()
            ema.after_step()
            after = _state(model, optimizer, ema)
            if trainer.iter in (1, 3):
                assert trainer.last_step_skipped
                _assert_same(before, after)
            else:
                assert not trainer.last_step_skipped
                assert any(not torch.equal(before[0][k], after[0][k]) for k in before[0]), "no weight moved"
            trainer.storage.step()
    assert trainer.skipped_steps == 2 and trainer.consecutive_skips == 0
    skipped = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert len(skipped) == 2
    assert "iteration 1" in skipped[0] and "non-finite loss: loss_giou" in skipped[0]
    assert "iteration 3" in skipped[1] and "non-finite gradient" in skipped[1] and inject.param_name in skipped[1]
    assert all("image_0.png, image_1.png" in m for m in skipped)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.dtype.is_floating_point)


def test_consecutive_nonfinite_steps_stop_train_net_with_an_error_and_keep_the_checkpoints(blobs, tmp_path, monkeypatch, caplog):  # noqa: F811
    # every step from iteration 4 on has a NaN loss; checkpoints every 3 iterations
    original = train_net.SOITTrainer.run_step

    def nan_from_4(self):
        if self.iter >= 4 and not getattr(self, "_injected", False):
            Injector(self, term="loss_cls", loss_iters=range(4, 100))
            self._injected = True
        return original(self)

    monkeypatch.setattr(train_net.SOITTrainer, "run_step", nan_from_4)
    cfg = make_cfg(tmp_path / "run", 20, blobs, ["train.max_nonfinite_steps=3"])
    with pytest.raises(SystemExit) as stop:
        run(cfg)
    assert stop.value.code != 0 and "3 steps in a row" in str(stop.value.code) and "loss_cls" in str(stop.value.code)
    saved = sorted(f for f in os.listdir(tmp_path / "run") if f.startswith("model_"))
    assert saved == ["model_0000002.pth", "model_0000005.pth"]  # none after the run stopped at iteration 6
    state = torch.load(tmp_path / "run" / "model_0000005.pth", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.dtype.is_floating_point)
    assert state["trainer"]["skipped_steps"] == 2  # iterations 4 and 5 skipped before it was written


def test_fp16_gradient_scaler_skips_are_counted_and_logged(caplog):
    a, b = _same_size_pair()
    model = tiny_model().train()
    trainer = SOITTrainer(model, _batches([[a, b]]), torch.optim.AdamW(model.parameters(), lr=1e-4), precision="fp16")
    Injector(trainer, grad_iters={0})
    caplog.set_level(logging.WARNING, logger="soit")
    with EventStorage(0) as trainer.storage:
        trainer.iter = 0
        trainer.run_step()
        assert trainer.last_step_skipped and trainer.amp_skipped_steps == 1 and trainer.skipped_steps == 0
        assert trainer.storage.latest()["amp_skipped_steps"][0] == 1
    assert "GradScaler skipped the step" in caplog.text


def test_the_quick_start_trains_with_accumulation(blobs, tmp_path):  # noqa: F811
    trainer = run(make_cfg(tmp_path / "run", 3, blobs, ["train.grad_accum_steps=2"]))
    assert trainer.iter == 3 and trainer.grad_accum_steps == 2
    assert trainer.skipped_steps == 0
    assert os.path.isfile(tmp_path / "run" / "model_final.pth")
