"""Running one computation in float32 inside an autocast region (``attention_fp32``)."""
import torch

__all__ = ["fp32_under_autocast"]


def _to_fp32(x):
    if torch.is_tensor(x):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _to_fp32(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_fp32(v) for v in x)
    return x


def fp32_under_autocast(enabled: bool, device_type: str, function, *args, **kwargs):
    """``function(*args, **kwargs)``; when ``enabled`` and autocast is on for ``device_type``,
    with autocast off and every floating tensor argument (also inside dicts, lists and tuples)
    in float32. The result is float32 then; the caller's next autocast operation casts it back.

    Half-precision sampling locations round a position in a 100-pixel-wide map to about half
    a pixel (bf16) and half-precision attention sums can overflow (fp16): this keeps the
    deformable attention's sampling in float32 while the rest of the network runs in half
    precision, as detrex does for its deformable attention under AMP.
    """
    if enabled and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return function(*_to_fp32(args), **_to_fp32(kwargs))
    return function(*args, **kwargs)
