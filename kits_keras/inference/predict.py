"""Predicting one CT volume: preprocessing, sliding window, back to its grid.

:func:`predict_case` is pure NumPy/SciPy around a network callable
(``Artifact.network``): it preprocesses with the very function the TFDS
builder uses (:func:`kits_keras.data.preprocessing.preprocess_image`), predicts
by overlapping sliding window with mirroring
(:mod:`kits_keras.inference.sliding_window`), brings the probabilities back to
the input's grid and turns them into labels: the argmax of softmax
classes, or with ``model.output_mode="regions"`` the region maps' labels
(:func:`kits_keras.model.regions.regions_to_labels`).

Bounded memory: probabilities are held whole only at the network's
(resampled) resolution. Going back to the original grid is
:func:`kits_keras.data.preprocessing.resample_probabilities` with
``labels=True``: the preprocessing resampler, reducing each slab of slices
to labels at once, so the 1059 x 512 x 512 x 3 float volume (3.3 GB) never
exists.

Quality control: the mirroring-disagreement score is the share of predicted
foreground voxels (at network resolution) where the mirrored predictions of
the covering tiles disagree on the label, Gaussian-weighted over tiles (a
voxel counts when more than half of its tile weight disagrees). It is
estimated on every 2nd voxel along each axis (an unbiased sample at 1/8 of
the cost) and is None with ``tta="none"``. Cases above
``config.infer.qc_threshold`` are flagged for review.

:func:`segment_volume` adds the connected-component post-processing. The
batch jobs of ``kits-keras infer`` (files in, segmentations and reports out)
are :mod:`kits_keras.inference.jobs`.
"""

import dataclasses
import time

import numpy as np

from kits_keras import io
from kits_keras.inference import sliding_window as sw


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Result of :func:`predict_case`.

    Attributes:
        labels: uint8 ``(z, y, x)`` on the input's grid, in {0, 1, 2}
            (KiTS23 label set: {0, 1, 2, 3}).
        probabilities: float32 ``(z, y, x, C)`` at network resolution:
            per-class probabilities, or per-region ones (regions mode).
        network_spacing: spacing (mm, ``(z, y, x)``) of ``probabilities``.
        qc: dict. ``mirroring_disagreement`` (share, or None without
            mirroring), ``flagged`` (bool), ``threshold``, ``tta``,
            ``mirrorings`` (the axes flipped in each pass), ``tiles``,
            ``removed_outside_body_ml`` (kidney and tumour mL the network
            put outside the body, set to background).
        timings: dict of seconds: ``preprocess``, ``sliding_window``,
            ``network``, ``resample``, ``total``.
    """

    labels: np.ndarray
    probabilities: np.ndarray
    network_spacing: tuple
    qc: dict
    timings: dict


def mirroring_disagreement(probabilities, disagreement,
                           to_labels=None):
    """Share of predicted foreground voxels whose label changes with mirroring.

    Args:
        probabilities: float32 ``(z, y, x, C)``.
        disagreement: float32 map of
            :func:`kits_keras.inference.sliding_window.sliding_window` (every
            2nd voxel of ``probabilities``), or None.
        to_labels: callable ``(maps) -> labels`` over per-channel maps
            (:func:`kits_keras.model.regions.maps_to_labels_fn`). Defaults
            to the argmax.

    Returns:
        float in [0, 1], or None when there was no mirroring.
    """
    from kits_keras.data.preprocessing import argmax_labels

    if disagreement is None:
        return None
    # The disagreement map samples every 2nd voxel (sliding_window).
    sample = probabilities[::2, ::2, ::2]
    to_labels = to_labels or argmax_labels
    foreground = to_labels(list(np.moveaxis(sample, -1, 0))) > 0
    count = int(np.count_nonzero(foreground))
    if count == 0:
        return 0.0
    return float(np.count_nonzero(foreground & (disagreement > 0.5)) / count)


def _quality_control(window, to_labels, infer, removed, voxel_ml,
                     num_classes):
    """The ``qc`` dict of a :class:`Prediction`: mirroring disagreement
    against ``infer.qc_threshold``, tiles, and the mL per class removed
    outside the body (``removed``: voxels per label; ``num_classes`` is
    the model's label count, not its output channels: a region model
    has one channel fewer)."""
    score = mirroring_disagreement(window.probabilities, window.disagreement,
                                   to_labels)
    return {
        "mirroring_disagreement": score,
        "threshold": infer.qc_threshold,
        "flagged": bool(score is not None and score > infer.qc_threshold),
        "tta": infer.tta,
        # The axes flipped per pass: only those mirrored in training.
        "mirrorings": [list(axes) for axes in window.mirrorings],
        "tiles": window.tiles,
        # Foreground the network put outside the body (air, table), set to
        # background: mL per class.
        "removed_outside_body_ml": {
            name: round(removed.get(index, 0) * voxel_ml, 3)
            for index, name in enumerate(
                io.class_names(num_classes)) if index > 0},
    }


def predict_case(volume, network, config, stats, progress=None):
    """Segments one CT volume on its own grid.

    Args:
        volume: :class:`kits_keras.io.Volume`. CT in HU, ``(z, y, x)``.
        network: callable ``(B, z, y, x, 1) float32 -> (B, z, y, x, C)``
            probabilities (``Artifact.network``).
        config: :class:`kits_keras.config.ExperimentConfig`. Uses
            ``data.patch_size``, ``data.target_spacing`` and ``infer``.
        stats: :class:`kits_keras.data.preprocessing.IntensityStats` of
            training.
        progress: optional callable ``(tiles_done, tiles_total)``.

    Returns:
        :class:`Prediction` (labels before post-processing).
    """
    from kits_keras.inference.body_mask import remove_outside_body
    from kits_keras.data.preprocessing import preprocess_image
    from kits_keras.data.preprocessing import resample_probabilities
    from kits_keras.model.regions import maps_to_labels_fn

    infer = config.infer
    to_labels = maps_to_labels_fn(config.model.output_mode,
                                  config.data.label_set)
    start = time.perf_counter()
    target = tuple(config.data.target_spacing)
    image = preprocess_image(volume.array, volume.spacing, stats, target)
    t_pre = time.perf_counter()
    window = sw.sliding_window(
        image, network, config.data.patch_size, overlap=infer.overlap,
        tta=infer.tta, batch_size=infer.batch_size,
        sigma_scale=infer.gaussian_sigma_scale, progress=progress,
        to_labels=to_labels,
        trained_mirror_axes=config.augment.mirrored_axes,
    )
    del image
    t_win = time.perf_counter()
    labels = resample_probabilities(window.probabilities, volume.array.shape,
                                    labels=True, to_labels=to_labels)
    t_res = time.perf_counter()
    removed = remove_outside_body(labels, volume.array, volume.spacing,
                                  config.model.num_classes)
    qc = _quality_control(window, to_labels, infer, removed,
                          volume.voxel_volume_ml, config.model.num_classes)
    timings = {
        "preprocess": t_pre - start,
        "sliding_window": window.total_seconds,
        "network": window.network_seconds,
        "resample": t_res - t_win,
        "total": time.perf_counter() - start,
    }
    return Prediction(labels, window.probabilities, target, qc, timings)


def segment_volume(volume, network, config, stats, postprocess=True,
                   progress=None):
    """:func:`predict_case`, then post-processing with
    ``config.postprocess``.

    Returns:
        ``(labels, prediction, voxels_removed, postprocess_seconds)``.
    """
    from kits_keras.inference.postprocess import postprocess as clean

    pred = predict_case(volume, network, config, stats, progress=progress)
    t0 = time.perf_counter()
    labels = (clean(pred.labels, config.postprocess,
                    voxel_ml=volume.voxel_volume_ml)
              if postprocess else pred.labels)
    removed = int(np.count_nonzero(pred.labels != labels))
    return labels, pred, removed, time.perf_counter() - t0

