"""soit._C.ms_deform_attn_forward_offsets: the CPU forward from reference points and offsets in
pixels, the locations formed inside the kernel. It must give the composed path's bits
(locations = reference + offset / (W_l, H_l), then the kernel) and run only for inference."""
import pytest
import torch

from soit.layers.cpu_inference import plain_inference
from soit.layers.ms_deform_attn import MSDeformAttn, extension_status, force_pytorch, offsets_kernel
from soit.layers.ms_deform_attn.extension import compiled_module

pytestmark = pytest.mark.skipif(
    not extension_status().startswith("loaded"), reason="soit._C is not built: " + extension_status()
)


def _case(N=2, Lq=7, M=2, D=3, shapes=((4, 5), (3, 2), (1, 3)), P=2, dtype=torch.float64, B=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes, dtype=torch.long).view(-1, 2)
    areas = ss[:, 0] * ss[:, 1]
    lsi = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), ss.shape[0]
    value = torch.randn(N if B is None else B, S, M, D, generator=g).to(dtype)
    ref = (torch.rand(N, Lq, L, 2, generator=g) * 1.4 - 0.2).to(dtype)  # some outside [0, 1]
    offsets = (torch.randn(N, Lq, M, L, P, 2, generator=g) * 3).to(dtype)
    weights = torch.rand(N, Lq, M, L, P, generator=g).to(dtype)
    vi = None if B is None else torch.randint(0, B, (N,), generator=g)
    return value, ss, lsi, ref, offsets, weights, vi


def _composed(value, ss, lsi, ref, offsets, weights, vi):
    normalizer = torch.stack([ss[..., 1], ss[..., 0]], -1).to(offsets.dtype)
    locations = ref[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    return compiled_module().ms_deform_attn_forward(value, ss, lsi, locations, weights, vi)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "D,P,shapes,shared",
    [
        (3, 2, ((4, 5), (3, 2), (1, 3)), False),
        (32, 4, ((6, 7), (3, 4), (2, 2), (1, 1)), False),  # the encoder's fixed width
        (2, 4, ((6, 7),), True),
        (5, 3, ((4, 5), (0, 3), (2, 2)), True),  # an empty level
    ],
)
def test_equals_the_composed_locations_bit_for_bit(dtype, D, P, shapes, shared):
    case = _case(D=D, P=P, shapes=shapes, dtype=dtype, B=1 if shared else None, seed=D)
    got = compiled_module().ms_deform_attn_forward_offsets(*case)
    assert torch.equal(got, _composed(*case))


def test_zero_queries():
    value, ss, lsi, ref, offsets, weights, vi = _case(Lq=0)
    out = compiled_module().ms_deform_attn_forward_offsets(value, ss, lsi, ref, offsets, weights)
    assert out.shape == (2, 0, 6)


def test_bad_inputs_are_named():
    value, ss, lsi, ref, offsets, weights, _ = _case()
    fwd = compiled_module().ms_deform_attn_forward_offsets
    with pytest.raises(RuntimeError, match=r"reference_points must be \(N, Lq, L, 2\)"):
        fwd(value, ss, lsi, ref[:, :, :2].contiguous(), offsets, weights)
    with pytest.raises(RuntimeError, match="reference_points .* must have the offsets' dtype"):
        fwd(value, ss, lsi, ref.float(), offsets, weights)
    with pytest.raises(RuntimeError, match="reference_points must be a contiguous CPU tensor"):
        fwd(value, ss, lsi, ref.transpose(0, 1).contiguous().transpose(0, 1), offsets, weights)
    with pytest.raises(RuntimeError, match="attention_weights"):
        fwd(value, ss, lsi, ref, offsets, weights[..., :1].contiguous())


def test_the_module_takes_it_for_cpu_inference_only(monkeypatch):
    torch.manual_seed(0)
    attn = MSDeformAttn(embed_dim=32, num_heads=4, num_levels=2, num_points=2)
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.5)
    shapes = torch.tensor([[6, 5], [3, 3]])
    lsi = torch.tensor([0, 30])
    query, value = torch.randn(2, 9, 32), torch.randn(2, 39, 32)
    ref = torch.rand(2, 9, 2, 2)
    ext = compiled_module()
    calls = []
    original = ext.ms_deform_attn_forward_offsets
    monkeypatch.setattr(ext, "ms_deform_attn_forward_offsets", lambda *a: calls.append(1) or original(*a))

    with torch.no_grad():
        fused = attn(query, ref, value, shapes, lsi)
        assert calls == [1]
        with plain_inference():
            plain = attn(query, ref, value, shapes, lsi)
        with force_pytorch():
            attn(query, ref, value, shapes, lsi)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    out = attn(query, ref, value, shapes, lsi)  # gradients recorded: the composition
    out.sum().backward()
    assert attn.sampling_offsets.weight.grad is not None
    assert calls == [1]
    assert offsets_kernel(value.half(), ref.half()) is None
