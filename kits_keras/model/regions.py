"""Nested regions of a label set, and network outputs back to labels.

The regions are KiTS's nested evaluation classes, outermost first. KiTS23
scores its three hierarchical evaluation classes (:data:`kits_keras.hec.
HECS`: kidney and masses {1, 2, 3}, masses {2, 3}, tumour {2}); KiTS19
scores kidney {1, 2} and tumour {2}. With ``model.output_mode="regions"``
the network has one sigmoid per region, trained with Dice + binary
cross-entropy per region (the top KiTS21/KiTS23 entries' "region-based
training"), and :func:`to_labels` turns the region maps into labels:
each region, from outermost to innermost, overwrites the label where its
probability is above 0.5 with the one label it holds that the next inner
region does not (KiTS23: kidney 1, cyst 3, tumour 2). So a voxel is
tumour if p_tumour > 0.5, else cyst if p_masses > 0.5, else kidney if
p_kidney_and_masses > 0.5, else background.

One implementation for NumPy (the predictor) and ``keras.ops`` (metrics):
the functions take the array namespace ``xp`` (``numpy`` or
``keras.ops``), both of which have ``where``, ``argmax`` and ``stack``.
This module imports no Keras.
"""

import numpy as np

from kits_keras import hec

# Label set -> ((region name, labels in it), ...), outermost first. The
# KiTS23 regions are the HECs of :mod:`kits_keras.hec`.
REGIONS = {
    "kits19": (("kidney", (1, 2)), ("tumour", (2,))),
    "kits23": tuple((h.name, h.labels) for h in hec.HECS),
}
# Probability above which a voxel is inside a region.
THRESHOLD = 0.5


def regions(label_set):
    """``((name, labels), ...)`` of ``label_set``, outermost first.

    >>> [name for name, _ in regions("kits23")]
    ['kidney_and_masses', 'masses', 'tumour']
    """
    if label_set not in REGIONS:
        raise ValueError(f"Unknown label_set. Expected one of "
                         f"{tuple(REGIONS)}. Received: {label_set!r}")
    return REGIONS[label_set]


def region_labels(label_set):
    """The label each region gives a voxel where it is the innermost one:
    its labels minus the next inner region's (one label each).

    >>> region_labels("kits23")
    (1, 3, 2)
    """
    table = regions(label_set)
    out = []
    for i, (name, labels) in enumerate(table):
        inner = set(table[i + 1][1]) if i + 1 < len(table) else set()
        own = sorted(set(labels) - inner)
        if len(own) != 1:
            raise ValueError(f"Region {name!r} must hold exactly one label "
                             f"outside the next inner region. Received: "
                             f"{own}")
        out.append(own[0])
    return tuple(out)


def num_outputs(model_config, label_set):
    """Channels of the network's output: classes, or regions."""
    if model_config.output_mode == "regions":
        return len(regions(label_set))
    return model_config.num_classes


def channel_names(model_config, label_set):
    """Names of the network's output channels: the classes (softmax) or
    the regions, outermost first.

    >>> from kits_keras.config import get_config
    >>> channel_names(get_config("tiny").model, "kits19")
    ('kidney', 'tumour')
    >>> channel_names(get_config("paper").model, "kits19")
    ('background', 'kidney', 'tumour')
    """
    if model_config.output_mode == "regions":
        return tuple(name for name, _ in regions(label_set))
    from kits_keras import io

    return tuple(io.class_names(model_config.num_classes))


def regions_to_labels(maps, label_set, xp=np):
    """Labels from region probabilities (see the module docstring).

    Args:
        maps: sequence of arrays of one shape, one per region outermost
            first (e.g. ``np.moveaxis(probs, -1, 0)``).
        label_set: str. "kits19" or "kits23".
        xp: ``numpy`` or ``keras.ops``.

    Returns:
        uint8 array (NumPy) or int32 tensor of the maps' shape.

    Example:
        >>> p = np.array([[0.9, 0.2, 0.1], [0.9, 0.7, 0.2], [0.9, 0.7, 0.6],
        ...               [0.3, 0.1, 0.1]])  # voxels x (kidney+m, m, t)
        >>> regions_to_labels(list(p.T), "kits23")  # kidney cyst tumour bg
        array([1, 3, 2, 0], dtype=uint8)
    """
    given = region_labels(label_set)
    maps = list(maps)
    if len(maps) != len(given):
        raise ValueError(f"Need one map per region of {label_set} "
                         f"({len(given)}). Received: {len(maps)} maps")
    dtype = "uint8" if xp is np else "int32"
    labels = xp.zeros_like(maps[0], dtype=dtype)
    for p, value in zip(maps, given):
        labels = xp.where(p > THRESHOLD, value, labels)
    return labels.astype(np.uint8) if xp is np else labels


def to_labels(probs, output_mode, label_set, xp=np):
    """Labels of network outputs ``(..., C)`` (channels last).

    ``"softmax"``: argmax over classes (ties go to the lower label);
    ``"regions"``: :func:`regions_to_labels`.
    """
    if output_mode == "regions":
        channels = [probs[..., c] for c in range(probs.shape[-1])]
        return regions_to_labels(channels, label_set, xp)
    if output_mode != "softmax":
        raise ValueError(f"Unknown output_mode. Received: {output_mode!r}")
    labels = xp.argmax(probs, axis=-1)
    return labels.astype(np.uint8) if xp is np else labels


def maps_to_labels_fn(output_mode, label_set):
    """A reducer ``fn(maps) -> uint8 labels`` over per-channel maps, as
    :func:`kits_keras.data.preprocessing.resample_probabilities` takes."""
    if output_mode == "regions":
        return lambda maps: regions_to_labels(maps, label_set)
    from kits_keras.data.preprocessing import argmax_labels

    return argmax_labels


def in_region(labels, region, xp=np):
    """Boolean mask of the voxels whose label is in ``region`` (a tuple of
    labels), for NumPy or ``keras.ops`` label arrays."""
    mask = labels == region[0]
    for value in region[1:]:
        mask = xp.logical_or(mask, labels == value)
    return mask
