"""The fused CPU mask-head sampling (soit._C.mask_head_sample): the same logits as the layer
composed from the deformable attention, taken only where no gradient is needed and the
compiled op would run, thread-count independent, bad inputs named."""
import pytest
import torch

from soit.layers.ms_deform_attn import extension, force_pytorch, mask_head_kernel
from soit.modeling.mask_head import InstanceAwareMaskHead

ext = extension.compiled_module()
# the suite builds soit._C (scripts/setup.sh); without it these tests must fail, not skip
assert ext is not None, f"soit._C is {extension.extension_status()}: run scripts/setup.sh"


def _case(M=4, K=4, C=8, n=5, B=2, h=9, w=13, dtype=torch.float64, offset_scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = InstanceAwareMaskHead(mask_channels=C, num_heads=M, num_points=K)
    feats = torch.randn(B, C, h, w, generator=g, dtype=dtype)
    pad = torch.zeros(B, h, w, dtype=torch.bool)
    pad[1:, 6:, :] = True  # the second image is padded at the bottom and right
    pad[1:, :, 10:] = True
    params = torch.randn(n, head.num_dynamic_params, generator=g, dtype=dtype)
    params[:, : 2 * M * K * C] *= offset_scale  # offsets of a few pixels (several leave the map)
    centers = torch.rand(n, 2, generator=g, dtype=dtype)
    bidx = torch.randint(0, B, (n,), generator=g)
    return head, (feats, pad, params, centers, bidx)


def _composed(head, args, **kwargs):
    with force_pytorch():
        return head(*args, **kwargs)


@pytest.mark.parametrize(
    "M,K,C,pos", [(4, 4, 8, "relative"), (4, 4, 8, "absolute"), (2, 3, 8, "none"), (4, 2, 16, "relative"), (1, 4, 4, "relative")]
)  # fmt: skip
def test_fused_equals_the_composed_layer_float64(M, K, C, pos):
    head, args = _case(M, K, C)
    head.pos_encoding = pos
    assert mask_head_kernel(args[0], args[2]) is not None
    with torch.no_grad():
        fused = head(*args)
    torch.testing.assert_close(fused, _composed(head, args), rtol=0, atol=1e-12)


def test_fused_float32_and_reference_size_scaling():
    head, args = _case(dtype=torch.float32, offset_scale=2.0, n=12, h=20, w=17)
    scale = torch.tensor([[1.5, 0.5], [2.0, 2.0]])
    with torch.no_grad():
        fused = head(*args, coordinate_scale=scale)
    torch.testing.assert_close(fused, _composed(head, args, coordinate_scale=scale), rtol=0, atol=2e-5)


def test_the_fused_op_runs_only_where_no_gradient_is_needed(monkeypatch):
    calls = []
    original = ext.mask_head_sample
    monkeypatch.setattr(ext, "mask_head_sample", lambda *a: calls.append(1) or original(*a))
    head, (feats, pad, params, centers, bidx) = _case(dtype=torch.float32)
    with torch.no_grad():
        head(feats, pad, params, centers, bidx)
    assert calls == [1]
    # training: the composed layer (gradients flow to the generated parameters)
    params.requires_grad_(True)
    out = head(feats, pad, params, centers, bidx)
    out.sum().backward()
    assert params.grad is not None and calls == [1]
    # force_pytorch and tracing keep the composed layer too
    with torch.no_grad(), force_pytorch():
        head(feats, pad, params.detach(), centers, bidx)
    # (check_trace=False: the checker reruns the function eagerly, where the fused op may run)
    traced = torch.jit.trace(lambda f, p: head(f, pad, p, centers, bidx), (feats, params.detach()), check_trace=False)
    with torch.no_grad():
        traced(feats, params.detach())
    assert calls == [1]
    # float16 is not fused
    assert mask_head_kernel(feats.half(), params.half()) is None


def test_fused_result_does_not_depend_on_the_thread_count():
    head, args = _case(dtype=torch.float32, n=7, h=16, w=15)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            one = head(*args)
        torch.set_num_threads(2)
        with torch.no_grad():
            two = head(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_bad_inputs_are_named():
    n, C, M, K, h, w = 2, 8, 4, 4, 3, 5
    offsets, logits = torch.randn(n, h * w, 2 * M * K), torch.randn(n, h * w, M * K)
    value = torch.randn(1, h * w, M, C // M)
    bidx = torch.zeros(n, dtype=torch.long)
    sample = ext.mask_head_sample
    assert sample(offsets, logits, value, bidx, h, w).shape == (n, h * w, C)
    with pytest.raises(RuntimeError, match="batch_index out of range"):
        sample(offsets, logits, value, bidx + 1, h, w)
    with pytest.raises(RuntimeError, match="do not fit a 4 x 5 map"):
        sample(offsets, logits, value, bidx, h + 1, w)
    with pytest.raises(RuntimeError, match="offsets"):
        sample(offsets[..., :-1].contiguous(), logits, value, bidx, h, w)
    with pytest.raises(RuntimeError, match="offsets is Double, value is Float"):
        sample(offsets.double(), logits, value, bidx, h, w)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        sample(offsets.transpose(0, 1).contiguous().transpose(0, 1), logits, value, bidx, h, w)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        sample(offsets.half(), logits.half(), value.half(), bidx, h, w)
