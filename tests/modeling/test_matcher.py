"""Hungarian matcher: optimality against brute force, the cost's terms and weights."""

import itertools
import math

import numpy as np
import pytest
import torch

from soit.modeling.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou
from soit.modeling.matcher import HungarianMatcher


def random_boxes(n, gen):
    """(n, 4) cxcywh boxes inside [0, 1]."""
    wh = 0.05 + 0.4 * torch.rand(n, 2, generator=gen)
    c = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=gen)
    return torch.cat([c, wh], 1)


def np_giou(a, b):
    """GIoU of two xyxy boxes (tuples)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (enclosing - union) / enclosing


def np_cost(logits, boxes, labels, tgt_boxes, wc=2.0, wb=5.0, wg=2.0, alpha=0.25, gamma=2.0):
    """(Q, n) matching cost, one entry at a time."""
    Q, n = logits.shape[0], len(labels)
    cost = np.zeros((Q, n))
    for q in range(Q):
        for j in range(n):
            p = 1 / (1 + math.exp(-float(logits[q, labels[j]])))
            pos = -math.log(p + 1e-12) * alpha * (1 - p) ** gamma
            neg = -math.log(1 - p + 1e-12) * (1 - alpha) * p**gamma
            l1 = float((boxes[q] - tgt_boxes[j]).abs().sum())
            a = box_cxcywh_to_xyxy(boxes[q]).tolist()
            b = box_cxcywh_to_xyxy(tgt_boxes[j]).tolist()
            cost[q, j] = wc * (pos - neg) + wb * l1 - wg * np_giou(a, b)
    return cost


def brute_force_min(cost):
    """Minimal total cost over all injective assignments of the n targets to Q predictions."""
    Q, n = cost.shape
    return min(sum(cost[perm[j], j] for j in range(n)) for perm in itertools.permutations(range(Q), n))


def test_giou_by_hand():
    a = torch.tensor([[0.3, 0.3, 0.7, 0.7]])
    b = torch.tensor([[0.4, 0.3, 0.8, 0.7], [0.0, 0.0, 0.1, 0.1]])
    # overlap 0.3 x 0.4 = 0.12, union 0.2, enclosing 0.5 x 0.4 = 0.2 -> IoU 0.6, GIoU 0.6
    # disjoint: union 0.16 + 0.01, enclosing 0.7 x 0.7 = 0.49 -> GIoU = -(0.49 - 0.17) / 0.49
    expected = torch.tensor([[0.6, -(0.49 - 0.17) / 0.49]])
    torch.testing.assert_close(generalized_box_iou(a, b), expected)
    assert generalized_box_iou(a, a).item() == pytest.approx(1.0)
    cxcywh = torch.tensor([[0.5, 0.4, 0.2, 0.6]])
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(cxcywh)), cxcywh)
    # degenerate boxes stay finite
    assert torch.isfinite(generalized_box_iou(torch.zeros(1, 4), torch.zeros(1, 4))).all()


def test_cost_entry_by_hand():
    matcher = HungarianMatcher()
    logits = torch.tensor([[0.0, 1.0, -2.0]])  # class 1: p = sigmoid(1)
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.4]])
    tgt_boxes = torch.tensor([[0.6, 0.5, 0.4, 0.4]])
    cost = matcher.cost_matrix(logits, boxes, torch.tensor([1]), tgt_boxes)
    p = 1 / (1 + math.exp(-1.0))
    focal = 0.25 * (1 - p) ** 2 * -math.log(p) - 0.75 * p**2 * -math.log(1 - p)
    # L1 = 0.1 (cx only); GIoU = 0.6 (the boxes of test_giou_by_hand)
    assert cost.item() == pytest.approx(2 * focal + 5 * 0.1 - 2 * 0.6, abs=1e-6)


def test_cost_weights_are_configurable():
    gen = torch.Generator().manual_seed(3)
    logits, boxes = torch.randn(4, 5, generator=gen), random_boxes(4, gen)
    labels, tgt = torch.tensor([0, 3]), random_boxes(2, gen)
    m = HungarianMatcher(cost_class=1.0, cost_bbox=0.5, cost_giou=3.0, focal_alpha=0.4, focal_gamma=1.0)
    ref = np_cost(logits, boxes, labels, tgt, 1.0, 0.5, 3.0, 0.4, 1.0)
    np.testing.assert_allclose(m.cost_matrix(logits, boxes, labels, tgt).numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_assignment_is_optimal(seed):
    gen = torch.Generator().manual_seed(seed)
    B, Q, K = 2, 5, 4
    logits, boxes = torch.randn(B, Q, K, generator=gen), random_boxes(B * Q, gen).view(B, Q, 4)
    counts = [int(torch.randint(1, Q + 1, (1,), generator=gen)), int(torch.randint(0, Q + 1, (1,), generator=gen))]
    targets = [{"labels": torch.randint(0, K, (n,), generator=gen), "boxes": random_boxes(n, gen)} for n in counts]
    matcher = HungarianMatcher()
    matches = matcher(logits, boxes, targets)
    for b, (src, tgt) in enumerate(matches):
        n = counts[b]
        assert src.dtype == tgt.dtype == torch.long and len(src) == len(tgt) == n
        assert len(set(src.tolist())) == n and sorted(tgt.tolist()) == list(range(n))
        if n == 0:
            continue
        cost = np_cost(logits[b], boxes[b], targets[b]["labels"], targets[b]["boxes"])
        np.testing.assert_allclose(
            matcher.cost_matrix(logits[b], boxes[b], targets[b]["labels"], targets[b]["boxes"]).numpy(),
            cost,
            rtol=1e-5,
            atol=1e-5,
        )
        total = sum(cost[s, t] for s, t in zip(src.tolist(), tgt.tolist()))
        assert total == pytest.approx(brute_force_min(cost), abs=1e-5)


def test_images_without_targets():
    logits, boxes = torch.randn(2, 3, 2), torch.rand(2, 3, 4) * 0.5 + 0.25
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    one = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    matches = HungarianMatcher()(logits, boxes, [empty, one])
    assert [len(s) for s, _ in matches] == [0, 1]
    assert matches[0][0].dtype == torch.long


def test_no_gradient_through_matching():
    logits = torch.randn(1, 3, 2, requires_grad=True)
    boxes = (torch.rand(1, 3, 4) * 0.5 + 0.25).requires_grad_()
    tgt = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    src, _ = HungarianMatcher()(logits, boxes, tgt)[0]
    assert not src.requires_grad
