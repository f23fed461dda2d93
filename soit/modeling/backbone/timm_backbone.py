"""Backbones from timm (e.g. Swin) as detectron2 ``Backbone``s."""
from typing import Sequence

from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone

__all__ = ["TimmBackbone"]


class TimmBackbone(Backbone):
    """A timm model in ``features_only`` mode; outputs ``stage{i+1}`` maps in NCHW.

    timm's Swin returns channels-last maps; they are permuted so that every backbone gives
    (N, C, H, W). With ``strict_img_size=False`` Swin pads its windows internally, but its patch
    embedding still needs both sides divisible by the patch size (4): ``size_divisibility``
    says so, and the meta-architecture pads the batch to it (800 x 1333 becomes 800 x 1336, the
    extra columns marked as padding like any other).
    """

    def __init__(self, model_name: str, out_indices: Sequence[int] = (1, 2, 3), *, pretrained: bool = False, **kwargs):
        """
        Args:
            model_name: a timm model name, e.g. "swin_large_patch4_window12_384".
            out_indices: feature stages to return (Swin: 1, 2, 3 are strides 8, 16, 32).
            pretrained: let timm load its weights (needs its model hub; off by default, use
                ``train.init_checkpoint`` instead).
            kwargs: passed to ``timm.create_model`` (e.g. ``strict_img_size=False``,
                ``drop_path_rate``).
        """
        super().__init__()
        import timm  # only this backbone needs timm

        self.body = timm.create_model(
            model_name, pretrained=pretrained, features_only=True, out_indices=tuple(out_indices), **kwargs
        )
        info = self.body.feature_info
        self._out_features = [f"stage{i + 1}" for i in out_indices]
        self._out_feature_channels = dict(zip(self._out_features, info.channels()))
        self._out_feature_strides = dict(zip(self._out_features, info.reduction()))
        self._channels_last = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")
        self._size_divisibility = _patch_divisibility(self.body)

    @property
    def size_divisibility(self) -> int:
        """The side multiple an input needs (a patch embedding's patch size; 0: any size)."""
        return self._size_divisibility

    def forward(self, x):
        feats = self.body(x)
        if self._channels_last:
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        return dict(zip(self._out_features, feats))

    def output_shape(self):
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }


def _patch_divisibility(body) -> int:
    """The largest patch size among the model's patch embeddings that do not pad by themselves
    (timm asserts divisibility there unless the input size is fixed); 0 when there is none."""
    sizes = [
        max(module.patch_size)
        for module in body.modules()
        if hasattr(module, "patch_size") and hasattr(module, "strict_img_size")
        and not getattr(module, "dynamic_img_pad", False)
    ]
    return max(sizes, default=0)
