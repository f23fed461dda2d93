"""ScaleBy (fixed test-time factor) and RandomRescale (multi-scale training)."""
import numpy as np
import pytest
from detectron2.data import transforms as T

from soit.data import RandomRescale, ScaleBy


def test_scale_by_resizes_both_sides_and_boxes():
    image = np.zeros((100, 60, 3), np.uint8)
    aug = T.AugInput(image, boxes=np.array([[10.0, 20.0, 30.0, 40.0]]))
    T.AugmentationList([ScaleBy(0.5)])(aug)
    assert aug.image.shape == (50, 30, 3)
    np.testing.assert_allclose(aug.boxes, [[5.0, 10.0, 15.0, 20.0]])
    assert isinstance(ScaleBy(1.0).get_transform(image), T.NoOpTransform)
    with pytest.raises(ValueError, match="positive factor"):
        ScaleBy(0)


@pytest.mark.parametrize("distribution,below_one", [("uniform", 1 / 3), ("log-uniform", 1 / 2)])
def test_random_rescale_draws_in_range(distribution, below_one):
    np.random.seed(0)
    image = np.zeros((200, 100, 3), np.uint8)
    aug = RandomRescale(0.5, 2.0, distribution)
    heights = np.array([aug.get_transform(image).apply_image(image).shape[0] for _ in range(600)])
    assert heights.min() >= 100 and heights.max() <= 400
    # the share of draws that shrink the image: 1/3 for uniform on [0.5, 2], 1/2 log-uniform
    assert abs((heights < 200).mean() - below_one) < 0.06


def test_random_rescale_rejects_bad_settings():
    with pytest.raises(ValueError, match="min_scale <= max_scale"):
        RandomRescale(2.0, 0.5)
    with pytest.raises(ValueError, match="distribution"):
        RandomRescale(0.5, 2.0, "normal")
