"""Exponential-logarithmic loss with multi-scale supervision (``keras.ops``).

Wong, Moradi, Tang, Syeda-Mahmood, "3D Segmentation with Exponential
Logarithmic Loss for Highly Unbalanced Object Sizes", MICCAI 2018::

    L = w_dice * mean_c[(-ln Dice_c)^gamma_dice]
      + w_ce * mean_x[w_l(x) * (-ln p_l(x))^gamma_ce]

Choices where the paper is silent:

* Dice is soft Dice per class over the **whole batch** (all samples' voxels
  pooled, nnU-Net's ``batch_dice``): a tumour absent from one patch of the
  batch does not produce a term of its own. ``mean_c`` runs over all classes,
  background included, as in Wong et al.
* ``mean_x`` is the plain mean over all voxels of the batch (not divided by
  the sum of weights).
* ``x^gamma`` has an infinite slope at ``x = 0`` (a perfect Dice, or
  ``p_l = 1``). Both powers are evaluated as ``(x + eps)^gamma - eps^gamma``
  with ``eps = 1e-6``: zero at a perfect prediction, finite gradient.
* Probabilities are clipped to ``[1e-7, 1]`` before the logarithm.

Region mode (``model.output_mode="regions"``, :func:`region_loss`): one
sigmoid per nested region (:mod:`kits_keras.model.regions`), and::

    L = w_dice * mean_r(1 - Dice_r) + w_ce * mean_r mean_x BCE_r(x)

with the same batch soft Dice and smoothing, the region-based training of
the top KiTS21/KiTS23 entries (nnU-Net's Dice + BCE on its "regions").

Multi-scale supervision: the output of decoder level ``i`` (full resolution
is ``i = 0``) gets weight ``2^-i``, normalised to sum 1. Unlike nnU-Net, the
coarsest output keeps its (small) weight: the paper supervises every decoder
level. With ``model.compile`` use one :class:`ExpLogLoss` per output and
``loss_weights=deep_supervision_weights(n)``; custom steps use
:func:`multi_scale_loss`, which computes the same value. On the TensorFlow
backend the Keras losses run as one XLA program each
(:mod:`kits_keras.model.fusion`).
"""

import functools

import keras
from keras import ops

from kits_keras.config import LossConfig
from kits_keras.model import regions as regions_lib
from kits_keras.model.fusion import fused

# Offset inside the powers (see module docstring).
POWER_EPSILON = 1e-6
# Floor on probabilities before the logarithm.
PROB_EPSILON = 1e-7
# ExpLogLoss's keyword defaults: LossConfig holds the numbers.
_DEFAULTS = LossConfig()


def _stable_power(x, gamma):
    return ops.power(x + POWER_EPSILON, gamma) - POWER_EPSILON**gamma


def exp_log_loss(y_true, y_pred, loss_config=LossConfig()):
    """Exponential-logarithmic loss of one output (scalar, float32).

    Args:
        y_true: int tensor ``(B, z, y, x)`` of labels in ``[0, C)`` (a
            trailing axis of size 1 and float dtypes are accepted).
        y_pred: tensor ``(B, z, y, x, C)`` of probabilities (softmax), any
            float dtype; computed in float32.
        loss_config: LossConfig. Weights, exponents, class weights, Dice
            smoothing. Defaults to ``LossConfig()``.

    Example:
        >>> import numpy as np
        >>> y = np.array([[[[0, 1], [2, 2]]]])
        >>> p = np.eye(3, dtype="float32")[y]
        >>> float(exp_log_loss(y, p)) < 1e-3
        True
    """
    y_pred = ops.cast(y_pred, "float32")
    num_classes = y_pred.shape[-1]
    if len(loss_config.class_weights) != num_classes:
        raise ValueError(
            f"class_weights needs one weight per class ({num_classes}). "
            f"Received: class_weights={loss_config.class_weights}"
        )
    labels = ops.reshape(
        ops.cast(y_true, "int32"), ops.shape(y_pred)[:-1]
    )
    one_hot = ops.one_hot(labels, num_classes, dtype="float32")
    y_pred = ops.clip(y_pred, PROB_EPSILON, 1.0)

    spatial = tuple(range(len(y_pred.shape) - 1))
    intersection = ops.sum(one_hot * y_pred, axis=spatial)
    denominator = ops.sum(one_hot, axis=spatial) + ops.sum(y_pred, axis=spatial)
    smooth = loss_config.smooth
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    # Clip at 0: rounding can push a perfect Dice a hair above 1.
    neg_log_dice = ops.maximum(-ops.log(dice), 0.0)
    dice_term = ops.mean(_stable_power(neg_log_dice, loss_config.gamma_dice))

    p_true = ops.sum(one_hot * y_pred, axis=-1)
    weights = ops.take(
        ops.convert_to_tensor(loss_config.class_weights, "float32"), labels
    )
    neg_log_p = ops.maximum(-ops.log(p_true), 0.0)
    ce_term = ops.mean(
        weights * _stable_power(neg_log_p, loss_config.gamma_ce)
    )
    return loss_config.w_dice * dice_term + loss_config.w_ce * ce_term


def region_loss(y_true, y_pred, loss_config=LossConfig(),
                label_set="kits23"):
    """Dice + binary cross-entropy per region, of one output (scalar).

    Args:
        y_true: int tensor ``(B, z, y, x)`` of labels (a trailing axis of
            size 1 and float dtypes are accepted).
        y_pred: tensor ``(B, z, y, x, R)`` of sigmoid probabilities, one
            channel per region of ``label_set`` outermost first.
        loss_config: LossConfig. ``w_dice``, ``w_ce`` and ``smooth``.
        label_set: str. "kits19" or "kits23".

    Example:
        >>> import numpy as np
        >>> y = np.array([[[[0, 1], [2, 3]]]])
        >>> p = np.stack([y > 0, y > 1, y == 2], -1).astype("float32")
        >>> float(region_loss(y, p)) < 1e-3
        True
    """
    table = regions_lib.regions(label_set)
    y_pred = ops.cast(y_pred, "float32")
    if y_pred.shape[-1] != len(table):
        raise ValueError(
            f"y_pred needs one channel per region of {label_set} "
            f"({len(table)}). Received: shape={y_pred.shape}")
    labels = ops.reshape(ops.cast(y_true, "int32"), ops.shape(y_pred)[:-1])
    target = ops.stack(
        [ops.cast(regions_lib.in_region(labels, r, ops), "float32")
         for _, r in table], axis=-1)
    p = ops.clip(y_pred, PROB_EPSILON, 1.0 - PROB_EPSILON)
    spatial = tuple(range(len(p.shape) - 1))
    intersection = ops.sum(target * p, axis=spatial)
    denominator = ops.sum(target, axis=spatial) + ops.sum(p, axis=spatial)
    smooth = loss_config.smooth
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    bce = -(target * ops.log(p) + (1.0 - target) * ops.log(1.0 - p))
    return (loss_config.w_dice * ops.mean(1.0 - dice)
            + loss_config.w_ce * ops.mean(bce))


def output_loss(y_true, y_pred, loss_config=LossConfig(),
                output_mode="softmax", label_set="kits19"):
    """The loss of one output: :func:`exp_log_loss` (softmax) or
    :func:`region_loss` (regions)."""
    if output_mode == "regions":
        return region_loss(y_true, y_pred, loss_config, label_set)
    return exp_log_loss(y_true, y_pred, loss_config)


def deep_supervision_weights(n):
    """Weights of ``n`` decoder outputs, full resolution first.

    Halving per level, normalised to sum 1; none is zero.

    Example:
        >>> [round(w, 4) for w in deep_supervision_weights(4)]
        [0.5333, 0.2667, 0.1333, 0.0667]
    """
    if n < 1:
        raise ValueError(f"Need at least one output. Received: n={n}")
    raw = [0.5**i for i in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


def multi_scale_loss(y_trues, y_preds, loss_config=LossConfig(),
                     output_mode="softmax", label_set="kits19"):
    """Weighted sum of :func:`output_loss` over decoder outputs.

    Args:
        y_trues: sequence of label tensors, one per output, each at the
            output's resolution (full resolution first).
        y_preds: sequence of probability tensors, same order.
        loss_config: LossConfig.
        output_mode: str. "softmax" or "regions" (``model.output_mode``).
        label_set: str. ``data.label_set`` (the regions).
    """
    if len(y_trues) != len(y_preds):
        raise ValueError(
            "Need one label tensor per output. Received: "
            f"{len(y_trues)} labels, {len(y_preds)} outputs"
        )
    weights = deep_supervision_weights(len(y_preds))
    total = 0.0
    for w, y_true, y_pred in zip(weights, y_trues, y_preds):
        total = total + w * output_loss(y_true, y_pred, loss_config,
                                        output_mode, label_set)
    return total


@keras.saving.register_keras_serializable(package="kits_keras")
class RegionLoss(keras.losses.Loss):
    """Keras loss wrapper of :func:`region_loss` for one output.

    Args:
        w_dice, w_ce, smooth: as in :class:`kits_keras.config.LossConfig`,
            whose defaults they take.
        label_set: str. Whose regions. Defaults to "kits23".
        name: str. Defaults to "region_loss".

    Example:
        >>> RegionLoss.from_loss_config(LossConfig()).get_config()["w_ce"]
        0.2
    """

    def __init__(self, w_dice=_DEFAULTS.w_dice, w_ce=_DEFAULTS.w_ce,
                 smooth=_DEFAULTS.smooth, label_set="kits23",
                 name="region_loss", reduction="sum_over_batch_size",
                 dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        regions_lib.regions(label_set)  # refuses an unknown one
        self.label_set = label_set
        self.loss_config = LossConfig(w_dice=float(w_dice),
                                      w_ce=float(w_ce), smooth=float(smooth))
        self._fused = None

    @classmethod
    def from_loss_config(cls, loss_config, **kwargs):
        return cls(w_dice=loss_config.w_dice, w_ce=loss_config.w_ce,
                   smooth=loss_config.smooth, **kwargs)

    def call(self, y_true, y_pred):
        # A scalar, as ExpLogLoss: the batch Dice couples voxels.
        if self._fused is None:
            self._fused = fused(functools.partial(
                region_loss, loss_config=self.loss_config,
                label_set=self.label_set))
        return self._fused(y_true, y_pred)

    def get_config(self):
        config = super().get_config()
        lc = self.loss_config
        config.update(w_dice=lc.w_dice, w_ce=lc.w_ce, smooth=lc.smooth,
                      label_set=self.label_set)
        return config


@keras.saving.register_keras_serializable(package="kits_keras")
class ExpLogLoss(keras.losses.Loss):
    """Keras loss wrapper of :func:`exp_log_loss` for one output.

    Stores only hyperparameters; ``get_config`` round-trips them.

    Args:
        w_dice, w_ce, gamma_dice, gamma_ce, class_weights, smooth: as in
            :class:`kits_keras.config.LossConfig`, whose defaults they take.
        name: str. Defaults to "exp_log_loss".

    Example:
        >>> loss = ExpLogLoss.from_loss_config(LossConfig())
        >>> loss.get_config()["gamma_dice"]
        0.3
    """

    def __init__(self, w_dice=_DEFAULTS.w_dice, w_ce=_DEFAULTS.w_ce,
                 gamma_dice=_DEFAULTS.gamma_dice,
                 gamma_ce=_DEFAULTS.gamma_ce,
                 class_weights=_DEFAULTS.class_weights,
                 smooth=_DEFAULTS.smooth, name="exp_log_loss",
                 reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.loss_config = LossConfig(
            w_dice=float(w_dice), w_ce=float(w_ce),
            gamma_dice=float(gamma_dice), gamma_ce=float(gamma_ce),
            class_weights=tuple(float(w) for w in class_weights),
            smooth=float(smooth),
        )
        self._fused = None

    @classmethod
    def from_loss_config(cls, loss_config, **kwargs):
        return cls(
            w_dice=loss_config.w_dice, w_ce=loss_config.w_ce,
            gamma_dice=loss_config.gamma_dice,
            gamma_ce=loss_config.gamma_ce,
            class_weights=loss_config.class_weights,
            smooth=loss_config.smooth, **kwargs,
        )

    def call(self, y_true, y_pred):
        # A scalar: the loss couples voxels through the batch Dice, so there
        # are no per-sample values for Keras to reduce.
        if self._fused is None:
            self._fused = fused(functools.partial(
                exp_log_loss, loss_config=self.loss_config))
        return self._fused(y_true, y_pred)

    def get_config(self):
        config = super().get_config()
        lc = self.loss_config
        config.update(
            w_dice=lc.w_dice, w_ce=lc.w_ce, gamma_dice=lc.gamma_dice,
            gamma_ce=lc.gamma_ce, class_weights=list(lc.class_weights),
            smooth=lc.smooth,
        )
        return config
