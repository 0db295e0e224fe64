"""Keras metrics for training: KiTS19 region Dice on validation patches.

KiTS19 scores two nested regions rather than the raw classes: *kidney* is
every voxel labelled kidney or tumour (label > 0), *tumour* is label == 2.
"""

import keras
from keras import ops

# Region name -> smallest label value inside the region (labels are nested:
# 0 background < 1 kidney < 2 tumour).
REGIONS = {"kidney": 1, "tumour": 2}


@keras.saving.register_keras_serializable(package="kits_keras")
class RegionDice(keras.metrics.Metric):
    """Dice of one KiTS19 region, pooled over every voxel of every batch.

    The prediction is the arg-max class of the probabilities. Pooling the
    intersection and the sizes over the whole validation set (instead of
    averaging per-patch Dice) keeps patches without that region from counting
    as 0 or 1. With the region absent from both labels and prediction the
    result is 1.

    Args:
        region: str. "kidney" (label > 0) or "tumour" (label == 2).
        name: str. Defaults to "<region>_dice".

    Example:
        >>> import numpy as np
        >>> m = RegionDice("tumour")
        >>> probs = np.eye(3, dtype="float32")[[[0, 2, 2, 1]]]
        >>> m.update_state(np.array([[0, 2, 1, 1]]), probs)
        >>> round(float(m.result()), 4)
        0.6667
    """

    def __init__(self, region="kidney", name=None, dtype=None):
        if region not in REGIONS:
            raise ValueError(
                f"Unknown region. Expected one of {tuple(REGIONS)}. "
                f"Received: region={region!r}"
            )
        super().__init__(name=name or f"{region}_dice", dtype=dtype)
        self.region = region
        self._min_label = REGIONS[region]
        self.intersection = self.add_variable(
            shape=(), initializer="zeros", name="intersection"
        )
        self.sizes = self.add_variable(
            shape=(), initializer="zeros", name="sizes"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        """``y_true`` int labels ``(B, z, y, x)``; ``y_pred`` probabilities
        ``(B, z, y, x, C)``."""
        predicted = ops.argmax(y_pred, axis=-1) >= self._min_label
        truth = ops.cast(y_true, "int32") >= self._min_label
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
        return {"region": self.region, "name": self.name, "dtype": self.dtype}
