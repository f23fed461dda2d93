"""Recording what the deformable attention samples: the recorded tensors are the ones the op
receives in the same forward, for every encoder, decoder, mask-encoder layer and the mask
head; nothing is recorded (or changed) outside the recording context."""
import importlib

import torch
from conftest import separated_tiny_model, two_images

from soit.layers.ms_deform_attn import MSDeformAttn
from soit.layers.ms_deform_attn.recording import record_attention, recording
from soit.modeling.mask_head import InstanceAwareMaskHead


# soit.layers exports the function ms_deform_attn under the package's name: import by path
attention_module = importlib.import_module("soit.layers.ms_deform_attn.module")
mask_head_module = importlib.import_module("soit.modeling.mask_head")


def _spy(monkeypatch):
    received = []
    for module in (attention_module, mask_head_module):
        original = module.ms_deform_attn

        def spy(value, shapes, start, locations, weights, _original=original, **kwargs):
            received.append((shapes, start, locations, weights, kwargs.get("value_index")))
            return _original(value, shapes, start, locations, weights, **kwargs)

        monkeypatch.setattr(module, "ms_deform_attn", spy)
    return received


def test_recorded_tensors_are_those_the_op_receives(monkeypatch):
    model = separated_tiny_model()
    received = _spy(monkeypatch)
    with torch.no_grad(), record_attention() as calls:
        model(two_images())
    assert not recording()
    assert len(calls) == len(received) > 0
    for call, (shapes, start, locations, weights, value_index) in zip(calls, received):
        assert call.locations is locations and call.weights is weights  # the very tensors
        assert torch.equal(call.spatial_shapes, shapes) and torch.equal(call.level_start_index, start)
        assert (call.value_index is None) == (value_index is None)
    kinds = [type(c.module) for c in calls]
    names = {id(m): n for n, m in model.named_modules()}
    order = [names[id(c.module)].split(".layers")[0] for c in calls if isinstance(c.module, MSDeformAttn)]
    assert order == (
        ["transformer.encoder"] * len(model.transformer.encoder.layers)
        + ["transformer.decoder"] * len(model.transformer.decoder.layers)
        + ["mask_encoder"] * len(model.mask_encoder.layers)
    )
    assert kinds.count(InstanceAwareMaskHead) == 1 and kinds[-1] is InstanceAwareMaskHead


def test_recording_changes_no_result_and_nothing_is_kept_outside_it():
    model = separated_tiny_model()
    with torch.no_grad():
        plain = model(two_images())
        with record_attention() as calls:
            recorded = model(two_images())
        after = model(two_images())
    assert calls
    for a, b, c in zip(plain, recorded, after):
        # the recorded pass takes the unfused CPU path: the same arithmetic up to rounding
        torch.testing.assert_close(a["instances"].scores, b["instances"].scores, rtol=0, atol=1e-5)
        assert torch.equal(a["instances"].scores, c["instances"].scores)
