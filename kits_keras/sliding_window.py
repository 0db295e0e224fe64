"""Overlapping sliding-window prediction with mirroring test-time augmentation.

Pure NumPy: the network is any callable
``network(batch float32 (B, z, y, x, 1)) -> float32 (B, z, y, x, C)``
returning probabilities (``Artifact.network`` in :mod:`kits_keras.artifact`).
Tiles are placed as nnU-Net places them (evenly spaced, first and last flush
with the volume border), weighted by a Gaussian importance map (centre voxels
of a tile are predicted with more context than its border), batched through
the network, and averaged in probability space over the mirrorings.

References: Isensee et al., nnU-Net, Nature Methods 2021
(``compute_steps_for_sliding_window``, ``compute_gaussian``).
"""

import dataclasses
import itertools
import math
import time

import numpy as np
from scipy import ndimage

TTA_MODES = ("all", "flip", "none")


@dataclasses.dataclass(frozen=True)
class WindowResult:
    """What :func:`sliding_window` returns.

    Attributes:
        probabilities: float32 ``(z, y, x, C)`` on the input's grid.
        disagreement: float32 ``(z, y, x)`` in [0, 1]: Gaussian-weighted share
            of covering tiles in which the mirrored predictions did not all
            give the same label; None without mirroring.
        tiles: number of tiles.
        network_calls: number of calls of the network.
        network_seconds: wall time spent inside the network.
        total_seconds: wall time of the whole call.
    """

    probabilities: np.ndarray
    disagreement: object
    tiles: int
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


def gaussian_importance_map(patch_size, sigma_scale=0.125):
    """Gaussian weights over a patch, max 1, smallest weight strictly > 0.

    Args:
        patch_size: tuple of ints ``(z, y, x)``.
        sigma_scale: sigma as a share of the patch size along each axis.
            Defaults to 1/8 (nnU-Net).

    Returns:
        float32 array of shape ``patch_size``.
    """
    impulse = np.zeros(patch_size, dtype=np.float64)
    impulse[tuple(p // 2 for p in patch_size)] = 1.0
    sigmas = [p * sigma_scale for p in patch_size]
    weights = ndimage.gaussian_filter(impulse, sigmas, mode="constant")
    weights /= weights.max()
    # Zeros at the corners would give 0/0 where only one tile covers a voxel.
    positive = weights[weights > 0]
    weights[weights <= 0] = positive.min()
    return weights.astype(np.float32)


def mirror_axes(tta):
    """The spatial axes (of a ``(z, y, x)`` volume) flipped in each TTA pass.

    ``"all"``: the 8 subsets of (z, y, x); ``"flip"``: the 4 in-plane
    subsets of (y, x); ``"none"``: only the identity.
    """
    if tta not in TTA_MODES:
        raise ValueError(
            f"Unknown tta. Expected one of {TTA_MODES}. Received: tta={tta!r}"
        )
    axes = {"all": (0, 1, 2), "flip": (1, 2), "none": ()}[tta]
    return [c for n in range(len(axes) + 1)
            for c in itertools.combinations(axes, n)]


def pad_to_patch(image, patch_size):
    """Pads ``image`` (constant 0) to at least ``patch_size``, centred.

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
    return np.pad(image, pads, mode="constant"), tuple(crop)


def _tile_slices(shape, patch_size, overlap):
    steps = compute_steps(shape, patch_size, overlap)
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


def _predict_batch(network, batch, flips, track_disagreement):
    """Mean probabilities over mirrorings, and whether the labels agreed."""
    mean = None
    first_labels, disagree = None, None
    for axes in flips:
        spatial = tuple(a + 1 for a in axes)
        inputs = np.flip(batch, spatial) if axes else batch
        probs = np.asarray(network(inputs[..., None]), dtype=np.float32)
        if axes:
            probs = np.flip(probs, spatial)
        if track_disagreement:
            labels = probs.argmax(-1)
            if first_labels is None:
                first_labels = labels
                disagree = np.zeros(labels.shape, dtype=bool)
            else:
                disagree |= labels != first_labels
        if mean is None:
            mean = np.array(probs, dtype=np.float32, copy=True)
        else:
            mean += probs
    if len(flips) > 1:
        mean *= np.float32(1.0 / len(flips))
    return mean, disagree


def sliding_window(image, network, patch_size, overlap=0.5, tta="none",
                   batch_size=2, sigma_scale=0.125, progress=None):
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

    Returns:
        :class:`WindowResult`. Its probabilities sum to 1 over classes
        wherever the network's do (weights are normalised per voxel).
    """
    start = time.perf_counter()
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"Expected a (z, y, x) volume. Received: {image.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1. Received: {batch_size}")
    patch_size = tuple(int(p) for p in patch_size)
    flips = mirror_axes(tta)
    timed = _TimedNetwork(network)
    padded, crop = pad_to_patch(image, patch_size)
    tiles = _tile_slices(padded.shape, patch_size, overlap)
    gauss = gaussian_importance_map(patch_size, sigma_scale)
    gauss4 = gauss[..., None]
    track = len(flips) > 1
    accum = None
    weight = np.zeros(padded.shape, dtype=np.float32)
    disagree = np.zeros(padded.shape, dtype=np.float32) if track else None
    for first in range(0, len(tiles), batch_size):
        group = tiles[first:first + batch_size]
        batch = np.stack([padded[s] for s in group])
        probs, dis = _predict_batch(timed, batch, flips, track)
        if accum is None:
            accum = np.zeros(padded.shape + (probs.shape[-1],), np.float32)
        for i, s in enumerate(group):
            tile = probs[i]
            tile *= gauss4
            accum[s] += tile
            weight[s] += gauss
            if track:
                disagree[s] += dis[i] * gauss
        if progress is not None:
            progress(min(first + batch_size, len(tiles)), len(tiles))
    inverse = np.reciprocal(weight[crop])
    probabilities = accum[crop]
    probabilities *= inverse[..., None]
    if track:
        disagree = disagree[crop] * inverse
    return WindowResult(
        probabilities=probabilities,
        disagreement=disagree,
        tiles=len(tiles),
        network_calls=timed.calls,
        network_seconds=timed.seconds,
        total_seconds=time.perf_counter() - start,
    )
