"""Automatic test-time magnification: predict each image at the magnification at which its
objects have the size the model was trained on.

The model records, when training starts, the distribution of its training objects' sizes at
the network input (:class:`soit.modeling.object_scale.TrainingScale`). At test time:

1. **Look** at the image at ``first_look`` (1: its own size, where most images are meant to
   be predicted, so that there the look is the prediction itself) and measure the size of
   the objects found (score-weighted median of their box sizes, over the detections scoring
   at least half the best one). The model measures objects well only near the sizes it was
   trained on: shown objects of half those sizes it reports them much larger (it draws the
   boxes it knows; at half size a crop of the training size can look like a crop of objects
   twice as large), shown objects of up to about twice those sizes it measures them well,
   and larger ones it cuts into pieces (docs/scale.md). So the first look is made at the
   size most likely to be right, not zoomed out. With ``first_look`` < 1, where the objects
   look less than half the trained size, or nothing is found, or fewer than three objects
   are found at other than the trained size (they may be the few large enough to see among
   many too small at this look), look again at twice the magnification, up to 1x.
2. **Choose** the factor that brings the measured median to the trained median, continuously
   (no grid). The image is predicted at its own size where nothing shows that its objects
   differ from the sizes the model knows: when that factor lies within the trained sizes'
   own spread of 1 (half their interquartile range in log size, at least 10 %), or when the
   measured median is one the median of as many objects drawn from the training sizes
   would reach with 95 % probability (:meth:`TrainingScale.median_log_range`: a crop
   holding one nucleus of a small but ordinary size is no evidence of a magnification).
   Objects cut by the image border show only part of themselves: when only such objects
   were found they may say that objects are larger than trained, never that they are
   smaller; and when the closest look found confident detections but all were cut at a
   corner (nothing to measure), an estimate from a farther look is not used.
3. **Predict** at that factor (reusing a look made at about that factor), tiled at the
   training input size when the image is larger than the training inputs, and check: a
   model's measurement is drawn toward the sizes it was trained on (shown smaller objects
   it reports them larger, shown larger ones smaller), so a look's error understates how
   far the factor is off. How much, two looks show: the measured log size moves by a
   ``slope`` times the log ratio of their magnifications (1 when faithful; measured against
   the nearest other look, or one at 1/sqrt(2) of the factor when there is none, clamped
   to [0.25, 1]). The objects' size at the look is taken as the trained size plus the
   remaining log ratio divided by the slope; while that is not the trained size (by the
   rule of step 2), move the factor by it, up to three times, never back past a look that
   showed them on the other side of the trained size.

The estimate is a median of sizes, so it does not depend on how many objects the image
holds, and on images at the training magnification it costs one and a half passes: the
first look is the prediction, the look at 1/sqrt(2) the comparison. Each image's chosen factor, the looks made and, when the choice
is uncertain (few objects to measure, objects of very different sizes, a factor outside the
range), a note are returned with its detections and the note is logged.
"""
import logging
import math
from typing import Callable, Dict

from .object_scale import TrainingScale, estimate_object_size, found_something
from .query_selection import TooFewTokensError
from .scale_search import rescale_input

__all__ = ["auto_scale_predict", "check_first_look"]

logger = logging.getLogger(__name__)

MIN_FACTOR, MAX_FACTOR = 0.25, 4.0
MIN_OBJECTS = 3  # fewer found at a look make its median a weak estimate
MAX_REFINEMENTS = 3  # looks after the first prediction, when its objects are not at the trained size
MIN_SLOPE = 0.25  # the least a measured log size is taken to follow the log magnification
COMPARISON_LOOK = 2**-0.5  # where a second look is taken, relative to the factor checked


def check_first_look(first_look) -> float:
    value = float(first_look)
    if not 0 < value <= 1:
        raise ValueError(f"scale_first_look must be in (0, 1], got {first_look!r}")
    return value


def auto_scale_predict(x: Dict, predict: Callable, training_scale: TrainingScale, first_look: float = 1.0) -> Dict:
    """Detections of one model input at the magnification chosen as in the module docstring.

    Args:
        x: one model input (detectron2 format).
        predict: ``predict(input) -> Instances`` in the input's "height" x "width" (the
            original image's coordinates); may raise ``TooFewTokensError`` for an input too
            small for the model, and that look is skipped.
        training_scale: what the model was trained on.
        first_look: the magnification of the first look, in (0, 1].

    Returns:
        ``{"instances": Instances, "scale": {"factor", "looks", "note"}}``: the factor the
        detections were predicted at, every magnification looked at (each costs about its
        square, in passes at the image's own size) and a note ("" when the choice is sure).
        The factor is also each instance's ``scale_factor`` field (for the ``Predictor``,
        which returns only ``Instances``).
    """
    trained = math.log(training_scale.median)
    tol = max(math.log(1.1), training_scale.log_half_spread)
    name = x.get("file_name", "an image")
    looks, notes = {}, []
    # detections come back in the output size ("height" x "width"), which the test mapper may
    # have resized the image from: sizes are measured in pixels of the network input
    h, w = x["image"].shape[-2:]
    per_output_pixel = math.sqrt(h * w / (x.get("height", h) * x.get("width", w)))

    def look(factor):
        try:
            inst = predict(rescale_input(x, factor))
        except TooFewTokensError as e:
            logger.debug(f"{name}: no look at {factor:.3g}x ({e})")
            inst = None
        looks[factor] = inst
        return inst

    factor, estimate, unmeasured = first_look, None, None
    while True:
        inst = look(factor)
        found = estimate_object_size(inst, factor * per_output_pixel) if inst is not None else None
        if found is not None:
            estimate, measured_at, unmeasured = found, factor, None
            # trusted: objects not too small to be seen, and either enough of them or seen at
            # the trained size (then this look confirms itself). A few objects that look
            # larger than trained may be the only ones visible among many too small to see
            # at this look (a photo of people and bottles at half size): look closer
            at_trained_size = abs(found.log_median - trained) <= tol
            if found.log_median >= trained - math.log(2) and (found.count >= MIN_OBJECTS or at_trained_size):
                break
        elif found_something(inst):
            unmeasured = factor  # confident detections, every one cut at a corner of the image
        if inst is None and factor < MAX_FACTOR:  # too small for the model: magnify, past 1x if need be
            factor = min(MAX_FACTOR, 2 * factor)
        elif factor < 1:
            factor = min(1.0, 2 * factor)
        else:
            break

    if unmeasured is not None:  # the closest look that found something could measure nothing
        target = max(1.0, unmeasured)
        notes.append(f"the objects found at {unmeasured:.3g}x are all cut by the image border: no size to measure")
    elif estimate is None:
        target = max(1.0, max((f for f, inst in looks.items() if inst is not None), default=1.0))
        notes.append(f"no confident detection at any look: predicted at {target:.3g}x")
    else:  # the last look that found something
        size = estimate.log_median - math.log(measured_at)  # the objects' log size at the image's own size
        target = math.exp(trained - size)
        if _at_trained_size(size, estimate.count, training_scale, tol):
            target = 1.0  # no evidence that the objects differ from the trained sizes
        elif not estimate.whole and target > 1:
            notes.append(
                f"only objects cut by the image border to measure ({math.exp(size):.0f} px at least): "
                "no evidence that they are smaller than trained"
            )
            target = 1.0
        if estimate.count < MIN_OBJECTS:
            notes.append(f"only {estimate.count} object(s) to measure at {measured_at:.3g}x")
        if estimate.log_half_spread > training_scale.log_half_spread + tol:  # no one factor suits them all
            notes.append(
                f"objects of very different sizes (log-size half spread {estimate.log_half_spread:.2f}, "
                f"trained {training_scale.log_half_spread:.2f})"
            )
        if not MIN_FACTOR <= target <= MAX_FACTOR:
            notes.append(f"factor {target:.3g} outside [{MIN_FACTOR}, {MAX_FACTOR}], clamped")
            target = min(max(target, MIN_FACTOR), MAX_FACTOR)

    target, inst = _settle(look, looks, target, training_scale, tol, per_output_pixel)
    if inst is None:  # too small for the model at that factor: the nearest larger look that worked
        larger = [f for f, found in looks.items() if found is not None and f > target]
        if larger:
            target = min(larger)
            inst = looks[target]
    if inst is None:
        raise TooFewTokensError(f"{name} is too small for the model at every magnification tried: {sorted(looks)}")
    inst.scale_factor = inst.scores.new_full((len(inst),), target)  # visible where only Instances travel
    note = "; ".join(notes)
    if note:
        logger.warning(f"{name}: magnification {target:.3g}x chosen with uncertainty: {note}")
    return {"instances": inst, "scale": {"factor": target, "looks": sorted(looks), "note": note}}


def _settle(look, looks, target, training_scale, tol, per_output_pixel):
    """Predict at ``target`` (reusing a look made at about that factor) and check there that
    the objects have the trained size. A model's measurement of an object is drawn toward the
    sizes it was trained on (shown smaller objects it reports them larger, shown larger ones
    smaller, docs/scale.md), so a look's error understates how far the factor is off. How
    much, the looks themselves show: between two magnifications the measured log size moves
    by ``slope`` times the log ratio (1 for a faithful measurement; measured, clamped to
    [``MIN_SLOPE``, 1]), and the factor moves by the remaining log ratio divided by it. A
    second look at half the factor is taken when there is none to compare with. While the
    objects' size so corrected is not the trained one (outside the tolerance and the 95 %
    range of the median of as many training objects), move, at most ``MAX_REFINEMENTS``
    times, never back past a look that showed the objects on the other side of the trained
    size (then the bracket is halved). Returns ``(factor, instances)``."""
    trained = math.log(training_scale.median)
    low_bound, high_bound = MIN_FACTOR, MAX_FACTOR  # factors shown too small / too large
    sizes = {}

    def measured(factor):
        if factor not in sizes:
            inst = looks.get(factor)
            found = estimate_object_size(inst, factor * per_output_pixel) if inst is not None else None
            sizes[factor] = found if found is not None and found.whole else None
        return sizes[factor]

    for refinement in range(MAX_REFINEMENTS + 1):
        reused = _reuse(looks, target, tol)
        target, inst = (reused, looks[reused]) if reused is not None else (target, look(target))
        found = estimate_object_size(inst, target * per_output_pixel) if inst is not None else None
        if found is None or refinement == MAX_REFINEMENTS:
            break
        if not found.whole:  # cut objects show a lower bound of their size
            if found.log_median < trained:
                break  # no evidence that they are smaller than trained
            slope = 1.0
        else:
            compared = [f for f in looks if f != target and measured(f) is not None]
            if not compared and target * COMPARISON_LOOK >= MIN_FACTOR:
                look(target * COMPARISON_LOOK)
                compared = [f for f in looks if f != target and measured(f) is not None]
            slope = 1.0
            if compared:
                other = min(compared, key=lambda f: abs(math.log(f / target)))
                rise = found.log_median - measured(other).log_median
                slope = min(1.0, max(MIN_SLOPE, rise / math.log(target / other)))
        step = (trained - found.log_median) / slope
        if _at_trained_size(trained - step, found.count, training_scale, tol):
            break
        if step > 0:
            low_bound = max(low_bound, target)
        else:
            high_bound = min(high_bound, target)
        refined = target * math.exp(step)
        if not low_bound < refined < high_bound:  # past a look that said otherwise: halve the bracket
            refined = math.sqrt(low_bound * high_bound)
        if abs(math.log(refined / target)) <= tol:
            break
        target = refined
    return target, inst


def _at_trained_size(log_size, count, training_scale, tol):
    """Whether a median log size of ``count`` objects is no evidence of a size other than the
    trained one: within ``tol`` of the trained median, or where the median of as many
    training objects falls with 95 % probability."""
    low, high = training_scale.median_log_range(count)
    return abs(log_size - math.log(training_scale.median)) <= tol or low <= log_size <= high


def _reuse(looks, target, tol):
    """The factor of the look made closest to ``target``, if within ``tol`` (log), else None."""
    close = [(abs(math.log(target / f)), f) for f, inst in looks.items() if inst is not None]
    close = [c for c in close if c[0] <= tol]
    return min(close)[1] if close else None
