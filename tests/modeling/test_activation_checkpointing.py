"""Activation checkpointing and float32 attention under autocast: same losses and gradients,
every part really recomputed, batch-norm statistics counted once, keys and copies intact."""
import copy

import pytest
import torch

from conftest import tiny_model, two_images

from soit.modeling.activation_checkpointing import PARTS, check_parts, set_activation_checkpointing


def _step(parts, seed=0, **overrides):
    """Losses, gradients and the model after one training forward + backward (dropout on)."""
    torch.manual_seed(seed)
    model = tiny_model(activation_checkpointing=list(parts), **overrides).train()
    torch.manual_seed(seed + 1)
    losses = model(two_images())
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: float(v) for k, v in losses.items()}, grads, model


def test_every_part_on_gives_the_same_losses_and_gradients_with_dropout():
    losses, grads, plain = _step(())
    losses_ckpt, grads_ckpt, model = _step(PARTS)
    assert model.activation_checkpointing == PARTS
    assert losses == losses_ckpt
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 100
    for name, g in grads.items():
        assert torch.allclose(grads_ckpt[name], g, rtol=1e-5, atol=1e-7), name
    # batch-norm statistics (the tiny backbone trains its BatchNorm) counted once, not twice
    state, state_ckpt = plain.state_dict(), model.state_dict()
    assert state.keys() == state_ckpt.keys()
    for key in state:
        if "running_" in key or "num_batches_tracked" in key:
            assert torch.allclose(state[key], state_ckpt[key], atol=1e-7), key


@pytest.mark.parametrize("part", PARTS)
def test_each_part_is_recomputed_in_the_backward_pass(part):
    torch.manual_seed(0)
    model = tiny_model(activation_checkpointing=[part]).train()
    watched = {
        "backbone": model.backbone.stages[-1][0],
        "encoder": model.transformer.encoder.layers[0],
        "mask_encoder": model.mask_encoder.layers[0],
        "decoder": model.transformer.decoder.layers[0],
        "mask_head": model.mask_head,
    }
    calls = {name: 0 for name in watched}

    def counter(name):
        def hook(*_):
            calls[name] += 1

        return hook

    for name, module in watched.items():
        if name == "mask_head":  # the generated layer runs inside the mask head's forward
            original = module._attend_layer

            def attend(*args, _original=original, **kwargs):
                calls["mask_head"] += 1
                return _original(*args, **kwargs)

            module._attend_layer = attend
        else:
            module.register_forward_pre_hook(counter(name))  # a recomputation may stop early
    losses = model(two_images())
    forward_only = dict(calls)
    sum(losses.values()).backward()
    for name in watched:
        if name == part:
            assert calls[name] == 2 * forward_only[name] > 0, name  # run again in the backward pass
        else:
            assert calls[name] == forward_only[name], name


def test_inference_and_eval_are_not_checkpointed():
    torch.manual_seed(0)
    model = tiny_model(activation_checkpointing=list(PARTS)).eval()
    reference = tiny_model().eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        a, b = model(two_images()), reference(two_images())
    for x, y in zip(a, b):
        assert torch.equal(x["instances"].scores, y["instances"].scores)


def test_a_deep_copy_runs_its_own_weights():
    """The EMA is a deep copy: its checkpointed backbone stages must use the copy's weights."""
    torch.manual_seed(0)
    model = tiny_model(activation_checkpointing=["backbone"]).train()
    shadow = copy.deepcopy(model)
    with torch.no_grad():
        for p in shadow.backbone.parameters():
            p.mul_(0.5)
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(model.backbone(x)["res5"], shadow.backbone(x)["res5"])
    assert shadow.backbone.stages[0].forward.module is shadow.backbone.stages[0]


def test_timm_backbone_uses_its_own_checkpointing_with_the_same_gradients():
    from soit.modeling.backbone.timm_backbone import TimmBackbone

    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        backbone = TimmBackbone("swin_tiny_patch4_window7_224", (1, 2, 3), strict_img_size=False).train()
        if on:
            set_activation_checkpointing(_Parts(backbone), ["backbone"])
            assert backbone.body.grad_checkpointing
        torch.manual_seed(1)
        sum(f.sum() for f in backbone(torch.randn(1, 3, 64, 64)).values()).backward()
        grads.append({n: p.grad for n, p in backbone.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-4, atol=1e-6), name


class _Parts:
    """A model with the parts set_activation_checkpointing reaches (a backbone under test)."""

    def __init__(self, backbone):
        self.backbone = backbone
        self.transformer = self.mask_encoder = self.mask_head = torch.nn.Module()
        self.transformer.encoder = self.transformer.decoder = torch.nn.Module()


def test_bad_parts_and_backbones_are_named():
    with pytest.raises(ValueError, match="unknown part"):
        check_parts(["encoder", "neck"])
    with pytest.raises(ValueError, match="list of parts"):
        check_parts("encoder")
    with pytest.raises(ValueError, match="Linear.*neither ResNet stages"):
        set_activation_checkpointing(_Parts(torch.nn.Linear(2, 2)), ["backbone"])


def _recording(monkeypatch, module_path):
    seen = []
    import importlib

    module = importlib.import_module(module_path)
    original = module.ms_deform_attn

    def record(value, shapes, start, locations, weights, **kwargs):
        seen.append((value.dtype, locations.dtype, weights.dtype))
        return original(value, shapes, start, locations, weights, **kwargs)

    monkeypatch.setattr(module, "ms_deform_attn", record)
    return seen


@pytest.mark.parametrize("attention_fp32", [False, True])
def test_attention_fp32_samples_in_float32_under_autocast(attention_fp32, monkeypatch):
    encoder = _recording(monkeypatch, "soit.layers.ms_deform_attn.module")
    mask_head = _recording(monkeypatch, "soit.modeling.mask_head")
    torch.manual_seed(0)
    model = tiny_model(attention_fp32=attention_fp32).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(two_images())
    sum(losses.values()).backward()
    assert encoder and mask_head
    for dtypes in encoder + mask_head:
        if attention_fp32:
            assert dtypes == (torch.float32,) * 3
        else:
            assert torch.bfloat16 in dtypes  # the value projection's output under autocast
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_attention_fp32_without_autocast_changes_nothing():
    a = _step((), attention_fp32=True)
    b = _step(())
    assert a[0] == b[0]
