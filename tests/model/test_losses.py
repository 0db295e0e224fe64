"""Tests of kits_keras/model/losses.py against a float64 NumPy reference."""

import keras
import numpy as np
import pytest

from kits_keras.config import LossConfig
from kits_keras.model.losses import ExpLogLoss
from kits_keras.model.losses import deep_supervision_weights
from kits_keras.model.losses import exp_log_loss
from kits_keras.model.losses import multi_scale_loss


def reference_loss(y_true, y_pred, cfg, eps=1e-6, p_eps=1e-7):
    """Wong et al.'s loss in float64, written independently of keras.ops."""
    y_pred = np.clip(np.asarray(y_pred, np.float64), p_eps, 1.0)
    c = y_pred.shape[-1]
    one_hot = np.eye(c)[y_true]
    axes = tuple(range(y_pred.ndim - 1))
    inter = (one_hot * y_pred).sum(axes)
    den = one_hot.sum(axes) + y_pred.sum(axes)
    dice = (2 * inter + cfg.smooth) / (den + cfg.smooth)
    nld = np.maximum(-np.log(dice), 0)
    dice_term = np.mean((nld + eps) ** cfg.gamma_dice - eps**cfg.gamma_dice)
    p_true = np.take_along_axis(y_pred, y_true[..., None], -1)[..., 0]
    nlp = np.maximum(-np.log(p_true), 0)
    w = np.asarray(cfg.class_weights)[y_true]
    ce_term = np.mean(w * ((nlp + eps) ** cfg.gamma_ce - eps**cfg.gamma_ce))
    return cfg.w_dice * dice_term + cfg.w_ce * ce_term


def random_case(seed, shape=(2, 4, 6, 5), c=3, absent=None):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, shape + (c,))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = rng.integers(0, c, shape)
    if absent is not None:
        labels[labels == absent] = 0
    return labels, probs.astype(np.float32)


def grad_wrt_pred(y_true, y_pred, cfg):
    """d loss / d y_pred on the active backend."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return np.asarray(
            jax.grad(lambda p: exp_log_loss(y_true, p, cfg))(y_pred)
        )
    if backend == "tensorflow":
        import tensorflow as tf

        p = tf.Variable(y_pred)
        with tf.GradientTape() as tape:
            loss = exp_log_loss(y_true, p, cfg)
        return tape.gradient(loss, p).numpy()
    pytest.skip(f"no gradient helper for {backend}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_float64_reference(seed):
    cfg = LossConfig(class_weights=(0.5, 1.0, 3.0), gamma_ce=0.5)
    y, p = random_case(seed)
    got = float(exp_log_loss(y, p, cfg))
    assert got == pytest.approx(reference_loss(y, p, cfg), rel=1e-5)


def test_hand_computed_value():
    # One voxel of each class, predicted with probability 0.5 on the true
    # class. Dice_c = (2*0.5 + 1) / (1 + 0.5 + 0.25 + 0.25 ... ) per class.
    cfg = LossConfig(gamma_dice=1.0, gamma_ce=1.0, smooth=0.0,
                     class_weights=(1.0, 1.0, 1.0))
    y = np.array([[[[0, 1, 2]]]])
    p = np.full((1, 1, 1, 3, 3), 0.25, np.float32)
    for i in range(3):
        p[0, 0, 0, i, i] = 0.5
    # Each class: intersection 0.5, sum of p 1.0, sum of g 1 -> Dice 0.5.
    expected = 0.8 * np.log(2.0) + 0.2 * np.log(2.0)
    assert float(exp_log_loss(y, p, cfg)) == pytest.approx(expected, 1e-5)


def test_perfect_prediction_is_zero():
    y, _ = random_case(3)
    p = np.eye(3, dtype=np.float32)[y]
    assert abs(float(exp_log_loss(y, p))) < 1e-4


def test_finite_at_zero_probability_and_absent_class():
    y, p = random_case(4, absent=2)
    p[..., 1] = 0.0  # p -> 0 for every kidney voxel
    p[..., 0] = 1.0 - p[..., 2]
    cfg = LossConfig()
    value = float(exp_log_loss(y, p, cfg))
    grad = grad_wrt_pred(y, p, cfg)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))
    assert value == pytest.approx(reference_loss(y, p, cfg), rel=1e-4)


def test_finite_gradient_at_perfect_prediction():
    y, _ = random_case(5)
    p = np.eye(3, dtype=np.float32)[y]
    grad = grad_wrt_pred(y, p, LossConfig())
    assert np.all(np.isfinite(grad))


def test_gradient_points_towards_truth():
    y, p = random_case(6)
    grad = grad_wrt_pred(y, p, LossConfig())
    true_grad = np.take_along_axis(grad, y[..., None], -1)
    assert np.all(true_grad < 0)  # raising p_true lowers the loss


def test_bfloat16_input():
    y, p = random_case(7)
    p16 = keras.ops.cast(p, "bfloat16")
    value = exp_log_loss(y, p16)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    assert float(value) == pytest.approx(float(exp_log_loss(y, p)), rel=2e-2)


def test_label_with_trailing_axis_and_float_dtype():
    y, p = random_case(8)
    a = float(exp_log_loss(y[..., None].astype(np.float32), p))
    assert a == pytest.approx(float(exp_log_loss(y, p)), rel=1e-6)


def test_wrong_number_of_class_weights():
    y, p = random_case(9)
    with pytest.raises(ValueError, match="class_weights"):
        exp_log_loss(y, p, LossConfig(class_weights=(1.0, 1.0)))


def test_keras_loss_config_round_trip():
    cfg = LossConfig(w_dice=0.7, w_ce=0.3, class_weights=(1.0, 2.0, 4.0))
    loss = ExpLogLoss.from_loss_config(cfg)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, ExpLogLoss)
    assert restored.loss_config == cfg
    y, p = random_case(10)
    assert float(restored(y, p)) == pytest.approx(
        reference_loss(y, p, cfg), rel=1e-5
    )


def test_deep_supervision_weights():
    w = deep_supervision_weights(4)
    assert sum(w) == pytest.approx(1.0)
    assert all(a == pytest.approx(2 * b) for a, b in zip(w, w[1:]))
    assert deep_supervision_weights(1) == [1.0]
    with pytest.raises(ValueError):
        deep_supervision_weights(0)


def test_multi_scale_loss_equals_weighted_sum():
    cfg = LossConfig()
    cases = [random_case(s, shape=(2, 8 // 2**s, 8 // 2**s, 8 // 2**s))
             for s in range(3)]
    ys = [c[0] for c in cases]
    ps = [c[1] for c in cases]
    w = deep_supervision_weights(3)
    expected = sum(wi * reference_loss(y, p, cfg)
                   for wi, y, p in zip(w, ys, ps))
    got = float(multi_scale_loss(ys, ps, cfg))
    assert got == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        multi_scale_loss(ys[:2], ps, cfg)


KERAS_LOSSES_ON_TENSORFLOW = """
import numpy as np
import tensorflow as tf
from kits_keras.config import LossConfig
from kits_keras.model.losses import ExpLogLoss, RegionLoss
from kits_keras.model.losses import exp_log_loss, region_loss

rng = np.random.default_rng(0)
cfg = LossConfig(class_weights=(0.5, 1.0, 3.0, 2.0), gamma_ce=0.5)
labels = rng.integers(0, 4, (2, 6, 8, 8)).astype("int32")
logits = tf.constant(rng.normal(0, 2, (2, 6, 8, 8, 4)).astype("float32"))
cases = [(ExpLogLoss.from_loss_config(cfg),
          lambda y, p: exp_log_loss(y, p, cfg), tf.nn.softmax),
         (RegionLoss.from_loss_config(cfg),
          lambda y, p: region_loss(y, p, cfg), tf.sigmoid)]
for loss, plain, activation in cases:
    assert loss._fused is None
    values, grads = [], []
    for fn in (loss, plain):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            # Softmax over the 4 classes; sigmoids of the 3 regions.
            probs = activation(logits)
            value = fn(labels, probs if activation is tf.nn.softmax
                       else probs[..., :3])
        values.append(float(value))
        grads.append(tape.gradient(value, logits).numpy())
    # Compiled with XLA, not the plain function.
    assert getattr(loss._fused, "_jit_compile", None) is True
    assert abs(values[0] - values[1]) < 1e-5 * abs(values[1]), values
    scale = np.abs(grads[1]).max()
    assert np.abs(grads[0] - grads[1]).max() < 1e-4 * scale
print("OK")
"""


@pytest.mark.large  # a TensorFlow process
def test_keras_losses_on_tensorflow_are_compiled_and_unchanged():
    import os
    import subprocess
    import sys

    env = dict(os.environ, KERAS_BACKEND="tensorflow",
               TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", KERAS_LOSSES_ON_TENSORFLOW], env=env,
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
