"""Overlapping sliding-window prediction with mirroring test-time augmentation.

Pure NumPy: the network is any callable
``network(batch float32 (B, z, y, x, 1)) -> float32 (B, z, y, x, C)``
returning probabilities (``Artifact.network`` in :mod:`kits_keras.artifact`).
Tiles are placed as nnU-Net places them (evenly spaced, first and last flush
with the volume border), weighted by a Gaussian importance map (centre voxels
of a tile are predicted with more context than its border), batched through
the network, and averaged in probability space over the mirrorings
(:class:`kits_keras.inference.aggregate.Aggregator` sums them).

References: Isensee et al., nnU-Net, Nature Methods 2021
(``compute_steps_for_sliding_window``, ``compute_gaussian``).
"""

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import math
import time

import numpy as np
from scipy import ndimage

from kits_keras.inference.aggregate import Aggregator
from kits_keras.inference.aggregate import qc_view

TTA_MODES = ("all", "flip", "none")


@dataclasses.dataclass(frozen=True)
class WindowResult:
    """What :func:`sliding_window` returns.

    Attributes:
        probabilities: float32 ``(z, y, x, C)`` on the input's grid.
        disagreement: float32 in [0, 1] on every 2nd voxel along each axis
            (``probabilities[::2, ::2, ::2]``): Gaussian-weighted share of
            the covering tiles in which the mirrored predictions did not all
            give the same label; None without mirroring.
        tiles: number of tiles.
        mirrorings: the axes flipped in each pass (:func:`mirror_axes`).
        network_calls: number of calls of the network.
        network_seconds: wall time spent inside the network.
        total_seconds: wall time of the whole call.
    """

    probabilities: np.ndarray
    disagreement: object
    tiles: int
    mirrorings: list
    network_calls: int
    network_seconds: float
    total_seconds: float


def compute_steps(image_size, patch_size, overlap):
    """Start index of every tile along each axis, as nnU-Net computes them.

    Along each axis the number of tiles is the smallest that keeps the step
    at most ``patch * (1 - overlap)``; the tiles are then spread evenly so
    the first starts at 0 and the last ends at the border.

    Args:
        image_size: tuple of ints ``(z, y, x)``, each >= the patch size.
        patch_size: tuple of ints ``(z, y, x)``.
        overlap: float in [0, 1). Share of the patch shared by neighbours.

    Example:
        >>> compute_steps((130, 256, 256), (48, 192, 192), 0.5)
        [[0, 20, 41, 62, 82], [0, 64], [0, 64]]
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1). Received: {overlap}")
    steps = []
    for size, patch in zip(image_size, patch_size):
        if size < patch:
            raise ValueError(
                f"Image smaller than the patch; pad first. Received: "
                f"image_size={tuple(image_size)}, patch_size={patch_size}"
            )
        target = patch * (1 - overlap)
        num = int(math.ceil((size - patch) / target)) + 1 if target else 1
        if num > 1:
            actual = (size - patch) / (num - 1)
            steps.append([int(round(actual * i)) for i in range(num)])
        else:
            steps.append([0])
    return steps


@functools.lru_cache(maxsize=8)
def _gaussian_lines(patch_size, sigma_scale):
    """The 1-D factors of the importance map, each with maximum 1.

    ``gaussian_filter`` of an impulse (nnU-Net's construction) is separable,
    so the map is the outer product of three 1-D filtered impulses. Each
    factor is positive everywhere (the filter's 4-sigma support reaches the
    patch border), so no weight is 0.
    """
    lines = []
    for p in patch_size:
        impulse = np.zeros(p, dtype=np.float64)
        impulse[p // 2] = 1.0
        line = ndimage.gaussian_filter1d(impulse, p * sigma_scale,
                                         mode="constant")
        line /= line.max()
        line[line <= 0] = line[line > 0].min()
        lines.append(line)
    return tuple(lines)


@functools.lru_cache(maxsize=8)
def _gaussian_cached(patch_size, sigma_scale):
    z, y, x = _gaussian_lines(patch_size, sigma_scale)
    weights = (z[:, None, None] * y[None, :, None] * x[None, None, :])
    weights = weights.astype(np.float32)
    weights.setflags(write=False)
    return weights


def _inverse_weight_factors(shape, patch_size, sigma_scale, steps):
    """Per-axis factors ``(z, y, x)`` whose outer product is 1 / (sum of the
    importance maps of all tiles) over the padded volume.

    The tiles form a grid and the map is separable, so the sum is the outer
    product of per-axis sums: no per-tile accumulation is needed.
    """
    factors = []
    for n, p, line, axis_steps in zip(
            shape, patch_size, _gaussian_lines(patch_size, sigma_scale),
            steps):
        total = np.zeros(n, dtype=np.float64)
        for st in axis_steps:
            total[st:st + p] += line
        factors.append((1.0 / total).astype(np.float32))
    return tuple(factors)


def gaussian_importance_map(patch_size, sigma_scale=0.125):
    """Gaussian weights over a patch, max 1, smallest weight strictly > 0.

    Args:
        patch_size: tuple of ints ``(z, y, x)``.
        sigma_scale: sigma as a share of the patch size along each axis.
            Defaults to 1/8 (nnU-Net).

    Returns:
        float32 array of shape ``patch_size`` (read-only, cached).
    """
    return _gaussian_cached(tuple(int(p) for p in patch_size),
                            float(sigma_scale))


def mirror_axes(tta, trained=(0, 1, 2)):
    """The spatial axes (of a ``(z, y, x)`` volume) flipped in each TTA pass.

    ``"all"``: the 8 subsets of (z, y, x); ``"flip"``: the 4 in-plane
    subsets of (y, x); ``"none"``: only the identity. Only axes in
    ``trained`` (those the network saw mirrored in training,
    :meth:`kits_keras.config.AugmentConfig.mirrored_axes`) are flipped, as
    nnU-Net restricts its test-time mirroring: a network that never saw a
    volume upside down would be averaged with its guesses on one.

    >>> mirror_axes("all", trained=(2,))
    [(), (2,)]
    """
    if tta not in TTA_MODES:
        raise ValueError(
            f"Unknown tta. Expected one of {TTA_MODES}. Received: tta={tta!r}"
        )
    axes = {"all": (0, 1, 2), "flip": (1, 2), "none": ()}[tta]
    axes = tuple(a for a in axes if a in trained)
    return [c for n in range(len(axes) + 1)
            for c in itertools.combinations(axes, n)]


def pad_to_patch(image, patch_size):
    """Pads ``image`` to at least ``patch_size``, centred, by mirroring it
    (``np.pad(mode="symmetric")``, repeated for pads longer than the image).

    Only a volume shorter than the patch along an axis is padded (a thin
    slab: 20 slices of 2 mm are 10 at the tiny config's 4 mm, against 32 in
    a patch). Training hardly sees that: the shortest KiTS19 scan (29
    slices of 5 mm) is 36 slices for tiny's 32 and 45 for the paper's 48,
    where the training pipeline pads its 3 with the minimum (air), the one
    place the two differ. A constant (the volume's minimum: air and fat after
    the foreground clip) put a slab of anatomy between two blocks of
    nothing, and the network called the air tumour: a 13-slice slab of a
    held-out synthetic case that the same model segments well at full
    length got 318 mL of tumour and no kidney (kidney + tumour Dice 0.0;
    437 mL more removed in air by the body mask); mirrored, 164 mL of
    kidney against 184 mL true, Dice 0.953, as the full-volume prediction
    on those slices (0.956), nothing in air. The mirrored copies'
    predictions are cropped away.

    Returns the padded array and the slices that crop it back.
    """
    pads, crop = [], []
    for size, patch in zip(image.shape, patch_size):
        total = max(patch - size, 0)
        before = total // 2
        pads.append((before, total - before))
        crop.append(slice(before, before + size))
    if not any(p for pair in pads for p in pair):
        return image, tuple(crop)
    return np.pad(image, pads, mode="symmetric"), tuple(crop)


def _tiles_from_steps(steps, patch_size):
    return [
        tuple(slice(s, s + p) for s, p in zip(start, patch_size))
        for start in itertools.product(*steps)
    ]


class _TimedNetwork:
    """Calls the network and adds up the wall time spent inside it."""

    def __init__(self, network):
        self.network = network
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, batch):
        start = time.perf_counter()
        out = self.network(batch)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def sliding_window(image, network, patch_size, overlap=0.5, tta="none",
                   batch_size=2, sigma_scale=0.125, progress=None,
                   to_labels=None, trained_mirror_axes=(0, 1, 2)):
    """Predicts class probabilities over a whole volume tile by tile.

    Args:
        image: float32 ``(z, y, x)``, preprocessed (normalised, resampled).
        network: callable ``(B, z, y, x, 1) -> (B, z, y, x, C)`` probabilities.
        patch_size: tuple of ints ``(z, y, x)``: tile shape the network takes.
        overlap: float. Share of a tile overlapping its neighbour.
            Defaults to 0.5.
        tta: str. ``"all"``, ``"flip"`` or ``"none"`` (:func:`mirror_axes`).
            Defaults to "none".
        batch_size: int. Tiles per network call. Defaults to 2.
        sigma_scale: float. Gaussian sigma / patch size. Defaults to 1/8.
        progress: optional callable ``(tiles_done, tiles_total)``.
        to_labels: optional callable ``(maps) -> uint8 labels`` over
            per-channel maps, for the mirroring disagreement (region
            outputs: :func:`kits_keras.model.regions.maps_to_labels_fn`).
            Defaults to the argmax.
        trained_mirror_axes: the axes ``tta`` may flip
            (:func:`mirror_axes`). Defaults to all three.

    Returns:
        :class:`WindowResult`. Its probabilities sum to 1 over classes
        wherever the network's do (weights are normalised per voxel).
    """
    start = time.perf_counter()
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(
            f"Expected a (z, y, x) volume. Received: {image.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1. Received: {batch_size}")
    patch_size = tuple(int(p) for p in patch_size)
    flips = mirror_axes(tta, trained_mirror_axes)
    timed = _TimedNetwork(network)
    padded, crop = pad_to_patch(image, patch_size)
    steps = compute_steps(padded.shape, patch_size, overlap)
    tiles = _tiles_from_steps(steps, patch_size)
    gauss = gaussian_importance_map(patch_size, sigma_scale)
    track = len(flips) > 1
    # QC on every 2nd voxel along each axis, counted from the first voxel of
    # the unpadded volume: 1/8 of the cost, an unbiased sample of the share.
    origin = tuple(c.start % 2 for c in crop)
    qc_shape = tuple(len(range(o, n, 2)) for o, n in zip(origin,
                                                         padded.shape))
    agg = Aggregator(
        padded.shape, gauss, len(flips), qc_shape if track else None,
        _inverse_weight_factors(padded.shape, patch_size, sigma_scale, steps),
        tiles, to_labels=to_labels,
    )
    _feed_tiles(padded, tiles, batch_size, flips, timed, agg,
                origin if track else None, progress)
    probabilities, disagree = _crop_results(agg, crop, origin, padded.shape,
                                            image.shape, track)
    return WindowResult(
        probabilities=probabilities,
        disagreement=disagree,
        tiles=len(tiles),
        mirrorings=flips,
        network_calls=timed.calls,
        network_seconds=timed.seconds,
        total_seconds=time.perf_counter() - start,
    )


def _feed_tiles(padded, tiles, batch_size, flips, timed, agg, qc_origin,
                progress):
    """Runs every batch of ``tiles`` of ``padded`` through the network once
    per mirroring in ``flips`` and feeds the outputs to ``agg``.

    ``qc_origin``: the origin of the QC grid
    (:func:`kits_keras.inference.aggregate.qc_view`), or None when there is
    no mirroring to compare.
    """
    groups = [tiles[i:i + batch_size]
              for i in range(0, len(tiles), batch_size)]

    def gather(group):
        return np.stack([padded[s] for s in group])[..., None]

    pending = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(1) as worker:
        # The worker gathers the next batch and sums the previous outputs
        # while the network runs; this thread only feeds the network.
        next_batch = worker.submit(gather, groups[0])
        for number, group in enumerate(groups):
            batch = next_batch.result()
            if number + 1 < len(groups):
                next_batch = worker.submit(gather, groups[number + 1])
            views = (None if qc_origin is None else
                     [qc_view(s, qc_origin) for s in group])
            for index, axes in enumerate(flips):
                spatial = tuple(a + 1 for a in axes)
                inputs = np.flip(batch, spatial) if axes else batch
                probs = np.asarray(timed(inputs), np.float32)
                if axes:
                    probs = np.flip(probs, spatial)
                pending.append(worker.submit(agg.add, group, index, probs,
                                             views))
                # At most two outputs wait: bounded memory.
                while len(pending) > 2:
                    pending.popleft().result()
            if progress is not None:
                progress(min((number + 1) * batch_size, len(tiles)),
                         len(tiles))
        while pending:
            pending.popleft().result()


def _crop_results(agg, crop, origin, padded_shape, image_shape, track):
    """The probabilities and the disagreement map (None without ``track``)
    of ``agg`` cropped back from the padded volume to the image."""
    accum, disagree, qc_weight = agg.accum, agg.disagree, agg.qc_weight
    probabilities = accum[crop]
    if crop != tuple(slice(0, n) for n in padded_shape):
        probabilities = np.ascontiguousarray(probabilities)
    if track:
        qc_crop = tuple(slice((c.start - o) // 2,
                              (c.start - o) // 2 + len(range(0, n, 2)))
                        for c, o, n in zip(crop, origin, image_shape))
        disagree = disagree[qc_crop] / qc_weight[qc_crop]
    else:
        disagree = None
    return probabilities, disagree
