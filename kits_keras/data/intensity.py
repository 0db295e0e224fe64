"""CT intensity normalisation: foreground statistics and the z-score.

nnU-Net's CT scheme: over the foreground voxels (kidney and tumour) of the
training cases, take the 0.5th and 99.5th HU percentiles as clip limits and
the mean and std of the clipped values; every image, for training and for
inference, is clipped to those limits and z-scored
(:func:`normalise`). Each case contributes a uniform sample of its
foreground voxels, which keeps the pass cheap.

Images are in Hounsfield units (HU) before :func:`normalise`.
"""

import dataclasses
import json

import numpy as np

from kits_keras import files



@dataclasses.dataclass(frozen=True)
class IntensityStats:
    """CT normalisation: clip to ``[clip_low, clip_high]`` HU, then z-score.

    Attributes:
        clip_low: float. 0.5th percentile of foreground HU (training split).
        clip_high: float. 99.5th percentile of foreground HU.
        mean: float. Mean of the clipped foreground HU.
        std: float. Standard deviation of the clipped foreground HU.
    """

    clip_low: float
    clip_high: float
    mean: float
    std: float

    def __post_init__(self):
        if not self.clip_low <= self.clip_high:
            raise ValueError(
                f"clip_low must be <= clip_high. Received: "
                f"clip_low={self.clip_low}, clip_high={self.clip_high}"
            )
        if not self.std > 0:
            raise ValueError(f"std must be > 0. Received: std={self.std}")

    def to_dict(self):
        return {k: float(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data):
        return cls(**{f.name: float(data[f.name])
                      for f in dataclasses.fields(cls)})

    def save_json(self, path):
        """Writes the statistics as JSON (atomically)."""
        return files.write_json(path, self.to_dict())

    @classmethod
    def load_json(cls, path):
        with open(path) as fh:
            return cls.from_dict(json.load(fh))


def foreground_sample(image, labels, max_voxels=100_000, seed=0):
    """Up to ``max_voxels`` HU values of voxels with ``labels > 0``, drawn
    uniformly without replacement (deterministic for a given seed)."""
    values = np.asarray(image)[np.asarray(labels) > 0]
    if values.size > max_voxels:
        rng = np.random.default_rng(seed)
        values = values[rng.choice(values.size, max_voxels, replace=False)]
    return values.astype(np.float32)


def stats_from_samples(samples):
    """IntensityStats from a list of foreground HU samples (one per case)."""
    values = np.concatenate([np.ravel(s) for s in samples]).astype(np.float64)
    if values.size == 0:
        raise ValueError("No foreground voxels: cannot compute intensity "
                         "statistics (are all label volumes empty?)")
    low, high = np.percentile(values, [0.5, 99.5])
    # Mean and std of the *clipped* values, so that normalised foreground
    # has mean 0 and std 1 (nnU-Net takes them before clipping).
    clipped = np.clip(values, low, high)
    return IntensityStats(float(low), float(high), float(clipped.mean()),
                          max(float(clipped.std()), 1e-3))


def compute_intensity_stats(pairs, max_voxels_per_case=100_000, seed=0):
    """Foreground intensity statistics over ``(image HU, labels)`` pairs.

    Call it with training cases only. Each case contributes a uniform sample
    of at most ``max_voxels_per_case`` foreground voxels (nnU-Net samples a
    fixed number per case too), which keeps the pass cheap.

    Example:

    >>> img = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    >>> lab = (img >= 500).astype(np.uint8)
    >>> s = compute_intensity_stats([(img, lab)])
    >>> round(s.clip_low, 1), round(s.clip_high, 1)
    (502.5, 996.5)
    """
    samples = [foreground_sample(img, lab, max_voxels_per_case, seed + i)
               for i, (img, lab) in enumerate(pairs)]
    return stats_from_samples(samples)


def normalise(image, stats):
    """Clips HU to the stats' percentiles and z-scores; returns float32."""
    out = np.clip(np.asarray(image, dtype=np.float32), stats.clip_low,
                  stats.clip_high)
    out -= np.float32(stats.mean)
    out *= np.float32(1.0 / stats.std)
    return out
