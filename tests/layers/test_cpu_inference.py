"""The faster CPU inference formulation of linear layers (soit.layers.cpu_inference): the
same values as F.linear up to rounding, and the plain F.linear wherever it must be."""
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from soit.layers.cpu_inference import apply_linear, fast_cpu_inference, linear, plain_inference

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear_up_to_rounding(relu, bias):
    torch.manual_seed(0)
    x = torch.randn(2, 333, 64)
    w = torch.randn(96, 64)
    b = torch.randn(96) if bias else None
    expected = F.linear(x, w, b)
    if relu:
        expected = expected.relu()
    with torch.no_grad():
        got = linear(x, w, b, relu=relu)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if relu:
        assert (got >= 0).all()


def test_linear_takes_strided_inputs_and_empty_batches():
    torch.manual_seed(0)
    x = torch.randn(64, 50).t()  # (50, 64), not contiguous
    w, b = torch.randn(32, 64), torch.randn(32)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        assert linear(torch.zeros(0, 7, 64), w, b).shape == (0, 7, 32)


def test_plain_where_the_fast_formulation_may_not_run():
    torch.manual_seed(0)
    x, w, b = torch.randn(40, 16), torch.randn(8, 16), torch.randn(8)
    with torch.no_grad():
        assert fast_cpu_inference(x)
        with plain_inference():
            assert not fast_cpu_inference(x)
            assert torch.equal(linear(x, w, b), F.linear(x, w, b))
        # float64 stays with ATen (oneDNN's linear is float32 here)
        assert torch.equal(linear(x.double(), w.double(), b.double()), F.linear(x.double(), w.double(), b.double()))
    assert not fast_cpu_inference(x)  # gradients recorded
    wg = w.clone().requires_grad_()
    linear(x, wg, b, relu=True).sum().backward()
    assert wg.grad is not None
    with torch.no_grad():
        traced = torch.jit.trace(lambda t: linear(t, w, b), x)
    assert "mkldnn" not in str(traced.graph)


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN linear")
def test_cpu_inference_takes_onednn():
    x, w, b = torch.randn(40, 16), torch.randn(8, 16), torch.randn(8)
    calls = []
    original = torch.ops.mkldnn._linear_pointwise

    def spy(*args):
        calls.append(args[3])
        return original(*args)

    with mock.patch.object(torch.ops.mkldnn, "_linear_pointwise", spy), torch.no_grad():
        linear(x, w, b, relu=True)
        with plain_inference():
            linear(x, w, b, relu=True)
    assert calls == ["relu"]


def test_apply_linear_calls_modules_it_cannot_see_through():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(apply_linear(layer, x, relu=True), layer(x).relu(), rtol=1e-5, atol=1e-5)
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        apply_linear(layer, x)
    assert seen == [(5, 8)]

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    scaled = Scaled(16, 8)
    with torch.no_grad():
        torch.testing.assert_close(apply_linear(scaled, x), 2 * F.linear(x, scaled.weight, scaled.bias))
