"""The whole model's CPU inference with the faster formulations (oneDNN linear layers, the
folded backbone, the fused attention entries) against plain_inference(): the same detections
up to float rounding, and the fast paths really taken."""
from unittest import mock

import torch

from conftest import separated_tiny_model, two_images
from soit.layers import plain_inference


def test_fast_cpu_inference_gives_the_plain_detections():
    model = separated_tiny_model(num_classes=3)
    batch = two_images()  # two sizes: the batch is padded
    layouts = []
    model.neck.register_forward_pre_hook(
        lambda m, args: layouts.append(all(f.is_contiguous(memory_format=torch.channels_last) for f in args[0]))
    )
    calls = []
    original = torch.ops.mkldnn._linear_pointwise

    def spy(*args):
        calls.append(1)
        return original(*args)

    with torch.no_grad(), mock.patch.object(torch.ops.mkldnn, "_linear_pointwise", spy):
        fast = model(batch)
        n_fast = len(calls)
        with plain_inference():
            plain = model(batch)
    assert layouts == [True, False]  # the folded backbone gives channels-last features
    assert n_fast > 0 and len(calls) == n_fast  # oneDNN linears in the fast call only
    for a, b in zip(fast, plain):
        a, b = a["instances"], b["instances"]
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)
        assert torch.equal(a.pred_classes, b.pred_classes)
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
        assert (a.pred_masks != b.pred_masks).float().mean() < 1e-3
