"""Predicting one CT volume: preprocessing, sliding window, back to its grid.

:func:`predict_case` is pure NumPy/SciPy around a network callable
(``Artifact.network``): it preprocesses with the very function the TFDS
builder uses (:func:`kits_keras.preprocessing.preprocess_image`), predicts by
overlapping sliding window with mirroring (:mod:`kits_keras.sliding_window`),
brings the probabilities back to the input's grid and takes the argmax.

Bounded memory: probabilities are held whole only at the network's
(resampled) resolution. Going back to the original grid is done in slabs of
slices: each slab is first interpolated linearly along z from the two nearest
network slices, then resampled in-plane by
:func:`kits_keras.preprocessing.resample_probabilities` and reduced to labels
at once, so the 1059 x 512 x 512 x 3 float volume (3.3 GB) never exists.

Quality control: the mirroring-disagreement score is the share of predicted
foreground voxels (at network resolution) where the mirrored predictions of
the covering tiles disagree on the label, Gaussian-weighted over tiles (a
voxel counts when more than half of its tile weight disagrees).
"""

import dataclasses
import logging
import time

import numpy as np

from kits_keras import sliding_window as sw

log = logging.getLogger(__name__)

# Bytes of float32 probabilities per slab when going back to the input grid.
SLAB_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Result of :func:`predict_case`.

    Attributes:
        labels: uint8 ``(z, y, x)`` on the input's grid, in {0, 1, 2}.
        probabilities: float32 ``(z, y, x, C)`` at network resolution.
        network_spacing: spacing (mm, ``(z, y, x)``) of ``probabilities``.
        qc: dict. ``mirroring_disagreement`` (share, or None without
            mirroring), ``flagged`` (bool), ``threshold``, ``tta``.
        timings: dict of seconds: ``preprocess``, ``sliding_window``,
            ``network``, ``resample``, ``total``.
    """

    labels: np.ndarray
    probabilities: np.ndarray
    network_spacing: tuple
    qc: dict
    timings: dict


def source_coordinates(n_out, n_in):
    """Input coordinate of each output voxel centre along one axis.

    Voxel centres are aligned as in a resize of the voxel grid (the corner of
    the first voxel maps onto itself): ``(o + 0.5) * n_in / n_out - 0.5``,
    clipped to ``[0, n_in - 1]``.
    """
    coords = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    return np.clip(coords, 0.0, n_in - 1.0)


def _z_interpolate(probs, coords):
    """Linear interpolation of ``probs`` along axis 0 at ``coords``."""
    lower = np.floor(coords).astype(np.int64)
    upper = np.minimum(lower + 1, probs.shape[0] - 1)
    frac = (coords - lower).astype(np.float32)[:, None, None, None]
    out = probs[lower] * (1.0 - frac)
    out += probs[upper] * frac
    return out


def labels_on_grid(probabilities, shape, slab_bytes=SLAB_BYTES):
    """Argmax of ``probabilities`` brought to ``shape``, slab by slab.

    Args:
        probabilities: float32 ``(z, y, x, C)`` at network resolution.
        shape: tuple ``(z, y, x)`` of the original grid.
        slab_bytes: int. Memory of one slab of float32 probabilities on the
            original grid. Defaults to 256 MiB.

    Returns:
        uint8 ``(z, y, x)`` labels of ``shape``.
    """
    from kits_keras.preprocessing import resample_probabilities

    shape = tuple(int(s) for s in shape)
    if tuple(probabilities.shape[:3]) == shape:
        return probabilities.argmax(-1).astype(np.uint8)
    per_slice = shape[1] * shape[2] * probabilities.shape[-1] * 4
    slab = max(1, int(slab_bytes // per_slice))
    coords = source_coordinates(shape[0], probabilities.shape[0])
    labels = np.empty(shape, dtype=np.uint8)
    for first in range(0, shape[0], slab):
        last = min(shape[0], first + slab)
        part = _z_interpolate(probabilities, coords[first:last])
        part = resample_probabilities(part, (last - first,) + shape[1:])
        labels[first:last] = np.asarray(part).argmax(-1)
    return labels


def mirroring_disagreement(probabilities, disagreement):
    """Share of predicted foreground voxels whose label changes with mirroring.

    Args:
        probabilities: float32 ``(z, y, x, C)``.
        disagreement: float32 ``(z, y, x)`` from
            :func:`kits_keras.sliding_window.sliding_window`, or None.

    Returns:
        float in [0, 1], or None when there was no mirroring.
    """
    if disagreement is None:
        return None
    foreground = probabilities.argmax(-1) > 0
    count = int(np.count_nonzero(foreground))
    if count == 0:
        return 0.0
    return float(np.count_nonzero(foreground & (disagreement > 0.5)) / count)


def predict_case(volume, network, config, stats, progress=None):
    """Segments one CT volume on its own grid.

    Args:
        volume: :class:`kits_keras.io.Volume`. CT in HU, ``(z, y, x)``.
        network: callable ``(B, z, y, x, 1) float32 -> (B, z, y, x, C)``
            probabilities (``Artifact.network``).
        config: :class:`kits_keras.config.ExperimentConfig`. Uses
            ``data.patch_size``, ``data.target_spacing`` and ``infer``.
        stats: :class:`kits_keras.preprocessing.IntensityStats` of training.
        progress: optional callable ``(tiles_done, tiles_total)``.

    Returns:
        :class:`Prediction` (labels before post-processing).
    """
    from kits_keras.preprocessing import preprocess_image

    infer = config.infer
    start = time.perf_counter()
    target = tuple(config.data.target_spacing)
    image = preprocess_image(volume.array, volume.spacing, stats, target)
    t_pre = time.perf_counter()
    window = sw.sliding_window(
        image, network, config.data.patch_size, overlap=infer.overlap,
        tta=infer.tta, batch_size=infer.batch_size,
        sigma_scale=infer.gaussian_sigma_scale, progress=progress,
    )
    del image
    t_win = time.perf_counter()
    labels = labels_on_grid(window.probabilities, volume.array.shape)
    t_res = time.perf_counter()
    score = mirroring_disagreement(window.probabilities, window.disagreement)
    qc = {
        "mirroring_disagreement": score,
        "threshold": infer.qc_threshold,
        "flagged": bool(score is not None and score > infer.qc_threshold),
        "tta": infer.tta,
        "tiles": window.tiles,
    }
    timings = {
        "preprocess": t_pre - start,
        "sliding_window": window.total_seconds,
        "network": window.network_seconds,
        "resample": t_res - t_win,
        "total": time.perf_counter() - start,
    }
    return Prediction(labels, window.probabilities, target, qc, timings)


def label_volumes_ml(labels, spacing):
    """Kidney (label 1), tumour (label 2) and their sum in mL."""
    # count_nonzero of a comparison: np.bincount on small ints is slow.
    counts = [0] + [int(np.count_nonzero(labels == v)) for v in (1, 2)]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {
        "kidney_ml": float(counts[1] * voxel_ml),
        "tumour_ml": float(counts[2] * voxel_ml),
        "kidney_and_tumour_ml": float((counts[1] + counts[2]) * voxel_ml),
    }
