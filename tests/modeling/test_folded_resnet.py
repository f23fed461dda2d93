"""CPU inference of a ResNet with its batch norms folded into the convolutions: the same
features as the backbone's own forward, and only where that holds."""
import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.modeling.backbone.resnet import BottleneckBlock

from soit.layers.cpu_inference import plain_inference
from soit.modeling.backbone.folded_resnet import can_fold, folded_resnet_forward, maybe_folded_forward


def resnet(depth, norm="FrozenBN", out_features=("res3", "res4", "res5"), dtype=torch.float32, seed=0):
    """A ResNet whose every norm has random (non-identity) statistics and affine terms."""
    torch.manual_seed(seed)
    kwargs = {} if depth < 50 else {"stride_in_1x1": False}
    stages = ResNet.make_default_stages(depth=depth, norm=norm, **kwargs)
    model = ResNet(BasicStem(3, 64, norm=norm), stages, out_features=list(out_features)).to(dtype).eval()
    for m in model.modules():
        if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            if m.weight is not None:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("depth", [18, 50])
def test_folded_forward_equals_the_backbone_in_float64(depth):
    model = resnet(depth, out_features=("stem", "res2", "res3", "res4", "res5"), dtype=torch.float64)
    x = torch.randn(2, 3, 70, 98, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        got = folded_resnet_forward(model, x)
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].shape == expected[name].shape
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-10 * scale)


def test_float32_agrees_up_to_rounding_and_gives_channels_last_features():
    model = resnet(50)
    x = torch.randn(1, 3, 128, 160)
    with torch.inference_mode():
        expected = model(x)
        got = maybe_folded_forward(model, x)
    for name in expected:
        scale = expected[name].abs().max().item()
        assert (got[name] - expected[name]).abs().max().item() <= 1e-5 * scale, name
        assert got[name].is_contiguous(memory_format=torch.channels_last)


def test_an_evaluating_batchnorm_folds_with_its_running_statistics():
    model = resnet(18, norm="BN")
    x = torch.randn(1, 3, 64, 64)
    assert can_fold(model)
    with torch.no_grad():
        expected = model(x)
        got = folded_resnet_forward(model, x)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4 * expected[name].abs().max().item())
    model.train()  # batch statistics: nothing to fold
    assert not can_fold(model)


def test_structures_it_does_not_know_run_the_backbones_own_forward():
    assert can_fold(resnet(18))
    assert not can_fold(resnet(18, norm="GN"))
    classifier = ResNet(BasicStem(3, 64), ResNet.make_default_stages(depth=18), num_classes=10)
    assert not can_fold(classifier)

    class MyBlock(BottleneckBlock):
        pass

    model = resnet(50)
    block = model.stages[0][0]
    model.stages[0][0] = MyBlock(64, 256, bottleneck_channels=64, stride=1, norm="FrozenBN")
    assert not can_fold(model)
    model.stages[0][0] = block
    assert can_fold(model)

    calls = []
    handle = model.stages[1][0].conv2.register_forward_hook(lambda *a: calls.append(1))
    assert not can_fold(model)
    with torch.no_grad():
        maybe_folded_forward(model, torch.randn(1, 3, 64, 64))
    assert calls == [1]  # the user's hook ran
    handle.remove()
    assert can_fold(model)

    class MyStem(BasicStem):
        pass

    model.stem = MyStem(3, 64, norm="FrozenBN")
    assert not can_fold(model)
    model.stem.__class__ = BasicStem
    assert can_fold(model)
    model.stem.conv1 = torch.nn.Conv2d(3, 64, 7, stride=2, padding=3)  # not detectron2's Conv2d
    assert not can_fold(model)


def test_the_folded_path_runs_only_for_cpu_inference():
    model = resnet(18)
    x = torch.randn(1, 3, 64, 64)

    def folded(out):
        return all(f.is_contiguous(memory_format=torch.channels_last) and not f.is_contiguous() for f in out.values())

    with torch.no_grad():
        assert folded(maybe_folded_forward(model, x))
        with plain_inference():
            assert not folded(maybe_folded_forward(model, x))
    # with gradients (training, or inference outside no_grad) the backbone's own forward
    out = maybe_folded_forward(model, x.requires_grad_())
    assert not folded(out)
    out["res5"].sum().backward()
    assert x.grad is not None

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, t):
            return maybe_folded_forward(self.model, t)["res5"]

    with torch.no_grad():
        traced = torch.jit.trace(Wrapper(), torch.randn(1, 3, 64, 64))
    assert "batch_norm" in str(traced.inlined_graph)  # the backbone's own forward was recorded
    torch.testing.assert_close(traced(x.detach()), model(x.detach())["res5"])
