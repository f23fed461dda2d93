"""A training sampler whose stream can be resumed where an interrupted run stopped."""
import itertools

from detectron2.data.samplers import TrainingSampler

__all__ = ["ResumableTrainingSampler"]


class ResumableTrainingSampler(TrainingSampler):
    """detectron2's infinite ``TrainingSampler`` (same seed, same stream), but each rank
    starts after its first ``skip`` indices.

    ``train_net.py`` sets ``skip = start_iter * images per batch per rank`` when resuming,
    so the resumed run sees the images the interrupted one would have seen next (exactly so
    without aspect-ratio grouping, whose buckets hold images back).
    """

    def __init__(self, size: int, shuffle: bool = True, seed=None, skip: int = 0):
        super().__init__(size, shuffle=shuffle, seed=seed)
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}")
        self._skip = skip

    def __iter__(self):
        start = self._rank + self._skip * self._world_size
        yield from itertools.islice(self._infinite_indices(), start, None, self._world_size)
