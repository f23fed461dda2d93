"""Instance-aware transformer (SOIT's dynamic mask head): parameter split, relative
encoding, batching, aligned upsampling. References are written in plain numpy."""

import math

import numpy as np
import pytest
from conftest import shared_file
import torch

from soit.modeling.mask_head import (
    InstanceAwareMaskHead,
    aligned_bilinear,
    normalized_valid_coordinates,
    mask_position_encoding,
)


def padding_mask(h, w, valid):
    """(B, h, w) bool padding for images whose valid (rows, cols) are given."""
    mask = torch.ones(len(valid), h, w, dtype=torch.bool)
    for b, (hv, wv) in enumerate(valid):
        mask[b, :hv, :wv] = False
    return mask


# ---------------------------------------------------------------- numpy references
def np_bilinear(value, x, y):
    """Sample value (C, h, w) at normalized (x, y): pixel centres at (i + 0.5) / size,
    zeros outside the map."""
    _, h, w = value.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    out = np.zeros(value.shape[0])
    for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * value[:, yy, xx]
    return out


def np_sine_pe(pad, center, num_feats=4):
    """(2*num_feats, h, w) relative encoding of one image (center None: absolute)."""
    not_pad = (~pad).astype(np.float64)
    y = np.cumsum(not_pad, 0)
    x = np.cumsum(not_pad, 1)
    y = y / (y[-1:, :] + 1e-6)
    x = x / (x[:, -1:] + 1e-6)
    cx, cy = (0.0, 0.0) if center is None else center
    y, x = (y - cy) * 2 * math.pi, (x - cx) * 2 * math.pi
    dims = [10000 ** (2 * (i // 2) / num_feats) for i in range(num_feats)]
    feats = []
    for u in (y, x):
        for i, t in enumerate(dims):
            feats.append(np.sin(u / t) if i % 2 == 0 else np.cos(u / t))
    return np.stack(feats)


def np_mask_logits(feats, pad, params, pe, M, K):
    """Mask logits (h, w) of one instance, looping over pixels, heads and points."""
    C, h, w = feats.shape
    mk, cm = M * K, C // M
    sizes = [2 * mk * C, 2 * mk, mk * C, mk, C, 1]
    bounds = np.cumsum([0] + sizes)
    ow, ob, aw, ab, pw, pb = (params[bounds[i] : bounds[i + 1]] for i in range(6))
    ow, aw = ow.reshape(2 * mk, C), aw.reshape(mk, C)
    value = feats * (~pad)[None]
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            z = feats[:, i, j] + (0 if pe is None else pe[:, i, j])
            off, att = ow @ z + ob, aw @ z + ab
            heads = []
            for m in range(M):
                a = np.exp(att[m * K : (m + 1) * K] - att[m * K : (m + 1) * K].max())
                a = a / a.sum()
                acc = np.zeros(cm)
                for k in range(K):
                    dx, dy = off[2 * (m * K + k)], off[2 * (m * K + k) + 1]
                    x, y = (j + 0.5 + dx) / w, (i + 0.5 + dy) / h
                    acc += a[k] * np_bilinear(value[m * cm : (m + 1) * cm], x, y)
                heads.append(acc)
            out[i, j] = pw @ np.maximum(np.concatenate(heads), 0) + pb[0]
    return out


# ---------------------------------------------------------------- parameter count / split
@pytest.mark.parametrize("M,K,C,D", [(4, 4, 8, 441), (8, 4, 8, 873), (1, 4, 8, 12 * 9 + 9), (4, 4, 16, 48 * 17 + 17)])
def test_num_dynamic_params(M, K, C, D):
    assert InstanceAwareMaskHead(mask_channels=C, num_heads=M, num_points=K).num_dynamic_params == D


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        InstanceAwareMaskHead(mask_channels=8, num_heads=3)
    with pytest.raises(ValueError, match="pos_encoding"):
        InstanceAwareMaskHead(pos_encoding="learned")
    head = InstanceAwareMaskHead()
    with pytest.raises(ValueError, match="441"):
        head(
            torch.zeros(1, 8, 3, 3),
            torch.zeros(1, 3, 3, dtype=torch.bool),
            torch.zeros(1, 440),
            torch.zeros(1, 2),
            torch.zeros(1, dtype=torch.long),
        )


def test_hand_set_parameters_follow_the_441_split():
    """Offsets and attention logits set through the biases only, at the slices of docs/model.md, section 5."""
    h, w = 4, 5
    feats = torch.randn(1, 8, h, w, dtype=torch.float64)
    pad = torch.zeros(1, h, w, dtype=torch.bool)
    p = torch.zeros(441, dtype=torch.float64)
    off_b = p[256:288].view(4, 4, 2)  # (head, point, xy)
    off_b[0, 0] = torch.tensor([1.0, 0.0])  # centre of the right neighbour
    off_b[0, 1] = torch.tensor([0.5, 0.5])  # corner shared by 4 pixels
    att_b = p[416:432].view(4, 4)
    att_b[0] = torch.tensor([0.0, math.log(3.0), -100.0, -100.0], dtype=torch.float64)  # softmax -> 1/4, 3/4, 0, 0
    p[432:440] = torch.tensor([1.0, -2.0, 0, 0, 0, 0, 0, 0])  # only head 0 (channels 0, 1)
    p[440] = 0.5
    head = InstanceAwareMaskHead(pos_encoding="none")
    out = head(feats, pad, p[None], torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))[0]

    v = feats[0].numpy()

    def expected(i, j):
        right = v[:2, i, j + 1] if j + 1 < w else np.zeros(2)  # outside the map: zeros
        quad = [v[:2, a, b] if a < h and b < w else np.zeros(2) for a in (i, i + 1) for b in (j, j + 1)]
        h0 = 0.25 * right + 0.75 * sum(quad) / 4
        return 0.5 + max(h0[0], 0) - 2 * max(h0[1], 0)

    for i, j in [(0, 0), (1, 2), (2, 3), (3, 4), (3, 1)]:
        assert out[i, j].item() == pytest.approx(expected(i, j), abs=1e-9)


@pytest.mark.parametrize("M,C,pos", [(4, 8, "relative"), (2, 4, "absolute"), (8, 16, "none")])
def test_random_parameters_match_numpy(M, C, pos):
    torch.manual_seed(0)
    K, h, w = 4, 5, 6
    head = InstanceAwareMaskHead(mask_channels=C, num_heads=M, num_points=K, pos_encoding=pos)
    feats = torch.randn(2, C, h, w, dtype=torch.float64)
    pad = padding_mask(h, w, [(h, w), (4, 4)])  # image 1 padded: exercises zeroed values
    params = torch.randn(3, head.num_dynamic_params, dtype=torch.float64)
    params[:, : 2 * M * K * C] *= 0.5  # offsets of a few pixels
    centers = torch.tensor([[0.3, 0.6], [0.5, 0.5], [0.9, 0.2]], dtype=torch.float64)
    bidx = torch.tensor([0, 1, 1])
    out = head(feats, pad, params, centers, bidx)
    for n in range(3):
        b = bidx[n].item()
        pe = None
        if pos != "none":
            pe = np_sine_pe(pad[b].numpy(), centers[n].tolist() if pos == "relative" else None, C // 2)
        ref = np_mask_logits(feats[b].numpy(), pad[b].numpy(), params[n].numpy(), pe, M, K)
        # the encoding is computed in float32, as in the released model
        np.testing.assert_allclose(out[n].numpy(), ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- relative position encoding
def test_encoding_layout_matches_numpy():
    pad = padding_mask(7, 8, [(5, 6)])
    centers = torch.tensor([[0.37, 0.81]])
    pe = mask_position_encoding(pad, centers, torch.tensor([0]), num_feats=4)
    np.testing.assert_allclose(pe[0].numpy(), np_sine_pe(pad[0].numpy(), (0.37, 0.81)), atol=1e-5)
    absolute = mask_position_encoding(pad, num_feats=4)
    np.testing.assert_allclose(absolute[0].numpy(), np_sine_pe(pad[0].numpy(), None), atol=1e-5)


def test_encoding_is_zero_displacement_at_the_centre_pixel():
    """The centre is set to the normalized coordinate of pixel (2, 3) as the encoding itself
    computes it (k / (extent + 1e-6) in float32), so the displacement there is exactly 0
    and the encoding exactly sin 0 = 0, cos 0 = 1 per frequency. A centre given as the
    rounder k / extent is off by ~1e-6 relative, well within 1e-5 after the 2*pi scale."""
    pad = padding_mask(7, 8, [(5, 6)])
    y, x = normalized_valid_coordinates(pad)
    i0, j0 = 2, 3
    zero_disp = torch.tensor([0.0, 1.0, 0.0, 1.0] * 2)
    centers = torch.stack([x[0, i0, j0], y[0, i0, j0]])[None]
    pe = mask_position_encoding(pad, centers, torch.tensor([0]), num_feats=4)
    assert torch.equal(pe[0, :, i0, j0], zero_disp)
    rounder = torch.tensor([[(j0 + 1) / 6, (i0 + 1) / 5]])
    pe = mask_position_encoding(pad, rounder, torch.tensor([0]), num_feats=4)
    torch.testing.assert_close(pe[0, :, i0, j0], zero_disp, atol=1e-5, rtol=0)
    # every other pixel is displaced, so the encoding differs there
    others = (pe[0] - zero_disp[:, None, None]).abs().amax(0) > 1e-3
    assert others.sum() == 7 * 8 - 1


def test_shifting_the_centre_shifts_the_map():
    pad = padding_mask(7, 8, [(5, 6)])
    step_y, step_x = 1 / (5 + 1e-6), 1 / (6 + 1e-6)
    c = torch.tensor([[0.4, 0.5], [0.4 + step_x, 0.5], [0.4, 0.5 + step_y]])
    pe = mask_position_encoding(pad, c, torch.zeros(3, dtype=torch.long), num_feats=4)
    # inside the valid region, one pixel right (down) of the shifted centre looks like the original
    torch.testing.assert_close(pe[1, :, :5, 1:6], pe[0, :, :5, 0:5], atol=1e-5, rtol=0)
    torch.testing.assert_close(pe[2, :, 1:5, :6], pe[0, :, 0:4, :6], atol=1e-5, rtol=0)
    assert not torch.allclose(pe[1], pe[0], atol=1e-2)


def test_absolute_equals_relative_to_the_origin():
    pad = padding_mask(6, 6, [(6, 6), (3, 5)])
    rel = mask_position_encoding(pad, torch.zeros(2, 2), torch.tensor([0, 1]), num_feats=4)
    torch.testing.assert_close(rel, mask_position_encoding(pad, num_feats=4))


# ---------------------------------------------------------------- batching
def _batched_vs_single(head, grad):
    torch.manual_seed(1)
    h, w, counts = 6, 7, [2, 0, 3]
    feats = torch.randn(3, 8, h, w, requires_grad=grad)
    pad = padding_mask(h, w, [(6, 7), (3, 3), (4, 6)])
    n = sum(counts)
    params = (0.3 * torch.randn(n, head.num_dynamic_params)).requires_grad_(grad)
    centers = torch.rand(n, 2, requires_grad=grad)
    bidx = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    weights = torch.randn(n, h, w)

    out = head(feats, pad, params, centers, bidx)
    singles = torch.cat([head(feats, pad, params[i : i + 1], centers[i : i + 1], bidx[i : i + 1]) for i in range(n)])
    torch.testing.assert_close(out, singles, rtol=1e-5, atol=1e-5)
    if grad:
        g_batched = torch.autograd.grad((out * weights).sum(), (feats, params))
        g_single = torch.autograd.grad((singles * weights).sum(), (feats, params))
        for a, b in zip(g_batched, g_single):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        out = head(feats, pad, params, centers, bidx)
        (out * weights).sum().backward()
        assert centers.grad is None, "box centres must be detached inside the mask head"


@pytest.mark.parametrize("pos", ["relative", "absolute", "none"])
def test_batched_equals_one_by_one_training(pos):
    _batched_vs_single(InstanceAwareMaskHead(pos_encoding=pos), grad=True)


def test_batched_equals_one_by_one_inference():
    with torch.inference_mode():
        _batched_vs_single(InstanceAwareMaskHead(), grad=False)


def test_no_instances():
    out = InstanceAwareMaskHead()(
        torch.randn(2, 8, 3, 4),
        torch.zeros(2, 3, 4, dtype=torch.bool),
        torch.zeros(0, 441),
        torch.zeros(0, 2),
        torch.zeros(0, dtype=torch.long),
    )
    assert out.shape == (0, 3, 4)


# ---------------------------------------------------------------- aligned bilinear
def np_aligned_bilinear(x, f):
    """(h, w) -> (f*h, f*w): out[Y, X] = bilinear value at source (max(Y - f//2, 0) / f,
    max(X - f//2, 0) / f) of x extended by replicating its last row/column."""
    h, w = x.shape
    ext = np.pad(x, ((0, 1), (0, 1)), mode="edge")
    out = np.zeros((f * h, f * w))
    for Y in range(f * h):
        for X in range(f * w):
            sy, sx = max(Y - f // 2, 0) / f, max(X - f // 2, 0) / f
            y0, x0 = math.floor(sy), math.floor(sx)
            fy, fx = sy - y0, sx - x0
            y1, x1 = min(y0 + 1, h), min(x0 + 1, w)
            out[Y, X] = (1 - fy) * ((1 - fx) * ext[y0, x0] + fx * ext[y0, x1]) + fy * (
                (1 - fx) * ext[y1, x0] + fx * ext[y1, x1]
            )
    return out


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_aligned_bilinear(factor):
    x = torch.randn(2, 3, 3, 5, dtype=torch.float64)
    out = aligned_bilinear(x, factor)
    assert out.shape == (2, 3, 3 * factor, 5 * factor)
    for b in range(2):
        for c in range(3):
            np.testing.assert_allclose(out[b, c].numpy(), np_aligned_bilinear(x[b, c].numpy(), factor), atol=1e-12)


def test_aligned_bilinear_keeps_input_pixels_on_the_grid():
    # input pixel (i, j) lands on output pixel (4i + 2, 4j + 2): the centre of its 4x4 block
    x = torch.randn(1, 1, 4, 4)
    torch.testing.assert_close(aligned_bilinear(x, 4)[0, 0, 2::4, 2::4], x[0, 0])


# ---------------------------------------------------------------- released-model outputs
def test_matches_released_model_outputs():
    """The released model's single-image inference: its F_mask, last-layer boxes and
    dynamic parameters give its stride-8 mask logits (and, upsampled, its binary masks)."""
    data = torch.load(shared_file("fixtures", "official_small.pt"), weights_only=True)
    head = InstanceAwareMaskHead()
    for res in data["results"]:
        feats = res["seg_memory"][None].float()
        h, w = feats.shape[-2:]
        # one detection per stored logit row (a query kept with two classes has one row)
        rows = res["det_mask_row"]
        first = [int((rows == r).nonzero()[0]) for r in range(len(res["mask_logits_query"]))]
        params = res["dyn_params"][first].float()
        centers = res["bbox_preds"][res["mask_logits_query"], :2].float()
        logits = head(
            feats, torch.zeros(1, h, w, dtype=torch.bool), params, centers, torch.zeros(len(first), dtype=torch.long)
        )
        torch.testing.assert_close(logits, res["mask_logits_1_8"].float(), atol=2e-6, rtol=0)
        H, W = res["size"]
        probs = aligned_bilinear(logits[None], 4).sigmoid()
        probs = torch.nn.functional.interpolate(probs, size=(H, W), mode="bilinear", align_corners=True)[0]
        masks = np.unpackbits(res["masks"]["packed"].numpy(), axis=-1, count=W).astype(bool)
        probs = probs[rows].numpy()
        # a few probabilities lie within 1e-5 of the threshold: only those may flip
        differ = (probs > 0.5) != masks
        assert np.all(np.abs(probs[differ] - 0.5) < 1e-5)
