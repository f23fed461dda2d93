"""soit/visualize_attention.py: the points drawn are the recorded locations in pixels, bad
detection indices are named, the picture has three panels."""
import pytest
import torch
from conftest import separated_tiny_model, synthetic_sample

from soit.visualize_attention import attention_of_detections, draw_attention


@pytest.fixture(scope="module")
def result():
    model = separated_tiny_model()
    # 128 x 192: divisible by the largest stride (64), so level extents equal the input size
    image = synthetic_sample(128, 192, [(0, 40, 50, 20, 25, (220, 60, 60)), (1, 90, 130, 18, 30, (60, 200, 90))])["image"]
    return model, image, attention_of_detections(model, image, top=2)


def test_points_are_the_recorded_locations_times_the_input_size(result, monkeypatch):
    import contextlib

    from soit.layers.ms_deform_attn import recording

    model, image, _ = result
    seen = []

    @contextlib.contextmanager
    def keep():
        with recording.record_attention() as calls:
            seen.append(calls)
            yield calls

    monkeypatch.setattr("soit.visualize_attention.record_attention", keep)
    entry = attention_of_detections(model, image, detections=[0])["detections"][0]
    names = {id(m): n for n, m in model.named_modules()}
    decoder = [c for c in seen[0] if names[id(c.module)].startswith("transformer.decoder")][-1]
    encoder = [c for c in seen[0] if names[id(c.module)].startswith("transformer.encoder")][-1]
    size = torch.tensor([192.0, 128.0])
    q = entry["query"]
    assert torch.equal(entry["decoder"]["points"], decoder.locations[0, q] * size)
    assert torch.equal(entry["decoder"]["weights"], decoder.weights[0, q])
    x, y = entry["encoder"]["pixel"]
    token = int(y) // 8 * (192 // 8) + int(x) // 8
    assert torch.equal(entry["encoder"]["points"], encoder.locations[0, token] * size)
    head = seen[0][-1]
    px, py = entry["mask_head"]["inside"]["pixel"]
    cell = py // 8 * (192 // 8) + px // 8
    assert torch.equal(entry["mask_head"]["inside"]["points"], head.locations[0, cell, :, 0] * size)


def test_a_missing_detection_is_named(result):
    model, image, out = result
    with pytest.raises(ValueError, match=f"detection index 1000 does not exist.*{len(out['instances'])} detections"):
        attention_of_detections(model, image, detections=[1000])


def test_picture_has_three_panels(result):
    _, image, out = result
    pic = draw_attention(image.permute(1, 2, 0).numpy(), out["detections"][0], out["instances"])
    assert pic.shape == (128, 3 * 192 + 2 * 4, 3) and pic.dtype.name == "uint8"
