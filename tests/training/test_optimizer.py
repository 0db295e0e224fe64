"""Tests of ``train.optimizer``, ``train.clip_norm`` and
``train.weight_decay`` (:func:`kits_keras.training.fit.make_optimizer`)."""

import numpy as np
import pytest


def _update_norm(train):
    """Global norm of the weight change of one step on a small model."""
    import keras

    from kits_keras.training.fit import make_optimizer

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(make_optimizer(train), loss="mse")
    before = [w.copy() for w in model.get_weights()]
    x = np.ones((8, 4), "float32") * 10.0
    model.train_on_batch(x, np.zeros((8, 3), "float32") - 100.0)
    return float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in
                             zip(model.get_weights(), before))))


def test_clip_norm_bounds_the_step():
    from kits_keras.config import TrainConfig

    plain = TrainConfig(optimizer="sgd", learning_rate=1.0, momentum=0.0)
    # With no momentum one SGD step moves the weights by lr * |gradient|.
    assert _update_norm(plain) > 1.0
    clipped = TrainConfig(optimizer="sgd", learning_rate=1.0, momentum=0.0,
                          clip_norm=0.5)
    assert _update_norm(clipped) == pytest.approx(0.5, rel=1e-4)


def test_weight_decay_shrinks_weights_without_gradient():
    import keras

    from kits_keras.config import TrainConfig
    from kits_keras.training.fit import make_optimizer

    weight = keras.Variable(np.full((3,), 2.0, "float32"))
    optimizer = make_optimizer(TrainConfig(
        optimizer="sgd", learning_rate=0.1, momentum=0.0, weight_decay=0.5))
    optimizer.apply_gradients([(np.zeros(3, "float32"), weight)])
    # Decoupled decay: w -= lr * weight_decay * w.
    np.testing.assert_allclose(np.asarray(weight), 2.0 * (1 - 0.05),
                               rtol=1e-6)


def test_compile_model_uses_the_configured_optimizer():
    from kits_keras import config as config_lib
    from kits_keras.training.fit import build_model
    from kits_keras.training.fit import compile_model

    tiny = config_lib.override(
        config_lib.get_config("tiny"), data={"patch_size": (16, 32, 32)},
        train={"optimizer": "sgd", "learning_rate": 0.01, "clip_norm": 12.0})
    optimizer = compile_model(build_model(tiny, 0), tiny).optimizer
    assert type(optimizer).__name__ == "SGD"
    assert optimizer.nesterov and optimizer.momentum == 0.99
    assert optimizer.global_clipnorm == 12.0
    assert float(optimizer.learning_rate) == pytest.approx(0.01)


def test_unknown_optimizer_is_refused():
    from kits_keras import config as config_lib

    with pytest.raises(ValueError, match="optimizer"):
        config_lib.override(config_lib.get_config("tiny"),
                            train={"optimizer": "rmsprop"})
