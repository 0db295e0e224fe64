"""Keras metrics for training: region Dice on validation patches.

KiTS scores nested regions rather than the raw classes. KiTS19: *kidney* is
every voxel labelled kidney or tumour (label > 0), *tumour* is label == 2.
KiTS23: *kidney* is its HEC "kidney and masses" (label > 0 again), *masses*
{2, 3} (tumour or cyst) and *tumour* {2}. Metric names are
``<region>_dice``; for KiTS23 the first is ``kidney_dice`` too, so that a
run's logs name the same region alike for both label sets.
"""

import keras
from keras import ops

from kits_keras.model import regions as regions_lib

# Metric region name -> region of :mod:`kits_keras.model.regions`, per
# label set.
REGIONS = {
    "kits19": {"kidney": "kidney", "tumour": "tumour"},
    "kits23": {"kidney": "kidney_and_masses", "masses": "masses",
               "tumour": "tumour"},
}


def region_names(label_set):
    """Metric region names of ``label_set``, outermost first.

    >>> region_names("kits23")
    ('kidney', 'masses', 'tumour')
    """
    return tuple(REGIONS[label_set])


@keras.saving.register_keras_serializable(package="kits_keras")
class RegionDice(keras.metrics.Metric):
    """Dice of one region, pooled over every voxel of every batch.

    The prediction is the network output's labels
    (:func:`kits_keras.model.regions.to_labels`: the arg-max class, or the
    region maps' labels). Pooling the
    intersection and the sizes over the whole validation set (instead of
    averaging per-patch Dice) keeps patches without that region from counting
    as 0 or 1. With the region absent from both labels and prediction the
    result is 1.

    Args:
        region: str. A name of :func:`region_names`: "kidney" (label > 0),
            "tumour" (label == 2), for "kits23" also "masses" (2 or 3).
        label_set: str. "kits19" or "kits23". Defaults to "kits19".
        output_mode: str. "softmax" or "regions" (``model.output_mode``).
            Defaults to "softmax".
        name: str. Defaults to "<region>_dice".

    Example:
        >>> import numpy as np
        >>> m = RegionDice("tumour")
        >>> probs = np.eye(3, dtype="float32")[[[0, 2, 2, 1]]]
        >>> m.update_state(np.array([[0, 2, 1, 1]]), probs)
        >>> round(float(m.result()), 4)
        0.6667
    """

    def __init__(self, region="kidney", label_set="kits19",
                 output_mode="softmax", name=None, dtype=None):
        names = REGIONS.get(label_set, {})
        if region not in names:
            raise ValueError(
                f"Unknown region of label_set={label_set!r}. Expected one "
                f"of {tuple(names)}. Received: region={region!r}"
            )
        super().__init__(name=name or f"{region}_dice", dtype=dtype)
        self.region = region
        self.label_set = label_set
        self.output_mode = output_mode
        self._labels = dict(regions_lib.regions(label_set))[names[region]]
        self.intersection = self.add_variable(
            shape=(), initializer="zeros", name="intersection"
        )
        self.sizes = self.add_variable(
            shape=(), initializer="zeros", name="sizes"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        """``y_true`` int labels ``(B, z, y, x)``; ``y_pred`` probabilities
        ``(B, z, y, x, C)``."""
        labels = regions_lib.to_labels(y_pred, self.output_mode,
                                       self.label_set, ops)
        predicted = regions_lib.in_region(labels, self._labels, ops)
        truth = ops.reshape(ops.cast(y_true, "int32"), ops.shape(labels))
        truth = regions_lib.in_region(truth, self._labels, ops)
        predicted = ops.cast(predicted, "float32")
        truth = ops.cast(truth, "float32")
        self.intersection.assign_add(ops.sum(predicted * truth))
        self.sizes.assign_add(ops.sum(predicted) + ops.sum(truth))

    def result(self):
        return ops.where(
            self.sizes > 0,
            2.0 * self.intersection / ops.maximum(self.sizes, 1.0),
            1.0,
        )

    def get_config(self):
        return {"region": self.region, "label_set": self.label_set,
                "output_mode": self.output_mode, "name": self.name,
                "dtype": self.dtype}
