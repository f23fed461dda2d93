"""Input projections (ChannelMapper) and the sine encodings."""
import math

import pytest
import torch

from soit.layers.position_encoding import box_sine_embedding, inverse_sigmoid, sine_position_encoding
from soit.modeling.neck import ChannelMapper

# Official R-50 neck tensors (name -> shape), from the authors' checkpoint.
OFFICIAL_NECK_R50 = {
    "convs.0.conv.weight": (256, 512, 1, 1),
    "convs.0.gn.weight": (256,),
    "convs.0.gn.bias": (256,),
    "convs.1.conv.weight": (256, 1024, 1, 1),
    "convs.1.gn.weight": (256,),
    "convs.1.gn.bias": (256,),
    "convs.2.conv.weight": (256, 2048, 1, 1),
    "convs.2.gn.weight": (256,),
    "convs.2.gn.bias": (256,),
    "extra_convs.0.conv.weight": (256, 2048, 3, 3),
    "extra_convs.0.gn.weight": (256,),
    "extra_convs.0.gn.bias": (256,),
}


def test_neck_state_dict_matches_official_r50():
    neck = ChannelMapper([512, 1024, 2048])
    assert {k: tuple(v.shape) for k, v in neck.state_dict().items()} == OFFICIAL_NECK_R50


def test_neck_shapes_and_extra_levels():
    torch.manual_seed(0)
    neck = ChannelMapper([8, 16, 32], out_channels=32, num_extra_levels=2, num_groups=8).eval()
    feats = [torch.randn(2, 8, 15, 20), torch.randn(2, 16, 8, 10), torch.randn(2, 32, 4, 5)]
    outs = neck(feats)
    assert [tuple(o.shape) for o in outs] == [
        (2, 32, 15, 20),
        (2, 32, 8, 10),
        (2, 32, 4, 5),
        (2, 32, 2, 3),
        (2, 32, 1, 2),
    ]
    # the first extra level reads C5 itself, the second the first extra output
    torch.testing.assert_close(outs[3], neck.extra_convs[0](feats[2]))
    torch.testing.assert_close(outs[4], neck.extra_convs[1](outs[3]))
    # no activation: GroupNorm output keeps negative values
    assert (outs[0] < 0).any()


def test_neck_init_and_errors():
    neck = ChannelMapper([64, 128], out_channels=32, num_groups=8)
    for conv in [m.conv for m in neck.convs] + [m.conv for m in neck.extra_convs]:
        fan_in = conv.weight[0].numel()
        fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
        assert conv.bias is None
        assert conv.weight.abs().max() <= math.sqrt(6.0 / (fan_in + fan_out))
    with pytest.raises(ValueError, match="expects 2 feature maps"):
        neck([torch.zeros(1, 64, 4, 4)])
    with pytest.raises(ValueError, match="divisible"):
        ChannelMapper([64], out_channels=30, num_groups=8)


def _mask(n, h, w, valid):
    m = torch.ones(n, h, w, dtype=torch.bool)
    for i, (vh, vw) in enumerate(valid):
        m[i, :vh, :vw] = False
    return m


def test_sine_position_values_at_hand_computed_pixels():
    f, eps = 8, 1e-6
    mask = _mask(1, 3, 4, [(2, 3)])  # valid 2 rows x 3 columns, padded bottom/right
    pos = sine_position_encoding(mask, num_feats=f)
    assert pos.shape == (1, 2 * f, 3, 4)
    # pixel (y=1, x=2): 2 valid pixels up to it in its column (of 2), 3 in its row (of 3)
    y = (2 - 0.5) / (2 + eps) * 2 * math.pi
    x = (3 - 0.5) / (3 + eps) * 2 * math.pi
    for k in range(f):
        t = 10000 ** (2 * (k // 2) / f)
        trig = math.sin if k % 2 == 0 else math.cos
        assert pos[0, k, 1, 2].item() == pytest.approx(trig(y / t), abs=1e-5)
        assert pos[0, f + k, 1, 2].item() == pytest.approx(trig(x / t), abs=1e-5)
    # pixel (0, 0): normalized coordinates 0.5 / 2 and 0.5 / 3 of 2 pi
    assert pos[0, 0, 0, 0].item() == pytest.approx(math.sin(0.5 / (2 + eps) * 2 * math.pi), abs=1e-6)
    assert pos[0, f, 0, 0].item() == pytest.approx(math.sin(0.5 / (3 + eps) * 2 * math.pi), abs=1e-6)


def test_sine_position_padding_invariance_and_unnormalized():
    padded = sine_position_encoding(_mask(2, 6, 7, [(6, 7), (4, 5)]), num_feats=16)
    alone = sine_position_encoding(_mask(1, 4, 5, [(4, 5)]), num_feats=16)
    # the valid pixels of a padded image are encoded as if the image were alone
    torch.testing.assert_close(padded[1:, :, :4, :5], alone)
    raw = sine_position_encoding(_mask(1, 2, 3, [(2, 3)]), num_feats=2, normalize=False)
    torch.testing.assert_close(raw[0, 0], torch.tensor([[1.0, 1, 1], [2, 2, 2]]).sin())
    torch.testing.assert_close(raw[0, 3], torch.tensor([[1.0, 2, 3], [1, 2, 3]]).cos())


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sine_position_traces_with_dynamic_shapes():
    traced = torch.jit.trace(lambda m: sine_position_encoding(m, num_feats=8), (_mask(2, 3, 4, [(3, 4), (2, 3)]),))
    other = _mask(3, 5, 7, [(5, 7), (4, 2), (1, 6)])
    torch.testing.assert_close(traced(other), sine_position_encoding(other, num_feats=8))


def test_inverse_sigmoid():
    x = torch.tensor([-3.0, 0.0, 2.5])
    torch.testing.assert_close(inverse_sigmoid(x.sigmoid()), x, atol=1e-4, rtol=0)
    ends = inverse_sigmoid(torch.tensor([-1.0, 0.0, 1.0, 2.0]))
    big = math.log(1 / 1e-5)
    torch.testing.assert_close(ends, torch.tensor([-big, -big, big, big]))


def test_box_sine_embedding():
    boxes = torch.tensor([[[0.5, 0.25, 0.1, 0.8]]])
    emb = box_sine_embedding(boxes)
    assert emb.shape == (1, 1, 512)
    for c, value in enumerate(boxes[0, 0].tolist()):
        for k in (0, 1, 2, 3, 126, 127):
            t = 10000 ** (2 * (k // 2) / 128)
            trig = math.sin if k % 2 == 0 else math.cos
            assert emb[0, 0, 128 * c + k].item() == pytest.approx(trig(value * 2 * math.pi / t), abs=1e-5)
