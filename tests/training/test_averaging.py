"""Tests of ``kits_keras.training.averaging`` (the weights' moving average
that validation and the saved model use) on small models, and of the
U-Net's fit with it."""

import numpy as np
import pytest


def _trained(use_ema=True, steps=5):
    """A dense model with a norm layer's non-trainable state, after
    ``steps`` Adam steps with (or without) a moving average."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(3),
        keras.layers.BatchNormalization(), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(
        0.05, use_ema=use_ema, ema_momentum=0.9), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = x[:, :1] * 2.0
    for _ in range(steps):
        model.train_on_batch(x, y)
    return model, x, y


def test_averaged_weights_are_the_optimizers_averages_in_weight_order():
    from kits_keras.training import averaging

    model, _, _ = _trained()
    averages = [np.asarray(a) for a in averaging.moving_averages(model)]
    weights = averaging.averaged_weights(model)
    raw = model.get_weights()
    assert len(weights) == len(raw)
    trainable = {id(v) for v in model.trainable_variables}
    seen = 0
    for variable, value, raw_value in zip(model.weights, weights, raw):
        if id(variable) in trainable:
            np.testing.assert_array_equal(value, averages[seen])
            assert not np.allclose(value, raw_value)  # 5 steps of 0.05
            seen += 1
        else:  # BatchNormalization's moving statistics: as they are
            np.testing.assert_array_equal(value, raw_value)
    assert seen == len(averages)


def test_without_averaging_everything_is_the_raw_model():
    from kits_keras.training import averaging

    model, x, _ = _trained(use_ema=False)
    assert averaging.moving_averages(model) is None
    for a, b in zip(averaging.averaged_weights(model), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    before = model.predict_on_batch(x)
    with averaging.averaged(model):
        np.testing.assert_array_equal(model.predict_on_batch(x), before)


def test_averaged_swaps_in_and_restores_even_after_an_error():
    from kits_keras.training import averaging

    model, x, _ = _trained()
    raw = [w.copy() for w in model.get_weights()]
    expected = averaging.averaged_weights(model)
    with pytest.raises(RuntimeError):
        with averaging.averaged(model):
            for a, b in zip(model.get_weights(), expected):
                np.testing.assert_array_equal(a, b)
            raise RuntimeError("validation failed")
    for a, b in zip(model.get_weights(), raw):
        np.testing.assert_array_equal(a, b)


def test_patch_validation_in_fit_scores_the_averaged_weights():
    import keras

    from kits_keras.training import averaging

    model, x, y = _trained()
    with averaging.averaged(model):
        averaged_loss = model.evaluate(x, y, verbose=0)
    raw_loss = model.evaluate(x, y, verbose=0)
    assert averaged_loss != pytest.approx(raw_loss)
    seen = model.evaluate(x, y, verbose=0,
                          callbacks=[averaging.ValidateAveraged()])
    assert seen == pytest.approx(averaged_loss)
    # and the raw weights are back for training
    assert model.evaluate(x, y, verbose=0) == pytest.approx(raw_loss)
    assert isinstance(model.optimizer, keras.optimizers.Adam)


def test_compile_averages_only_when_the_config_asks():
    from kits_keras import config as config_lib
    from kits_keras.training.fit import build_model
    from kits_keras.training.fit import compile_model

    small = {"patch_size": (16, 32, 32)}
    tiny = config_lib.override(config_lib.get_config("tiny"), data=small)
    assert tiny.train.ema_momentum == 0.0  # measured no better (tiny.py)
    assert not compile_model(build_model(tiny, 0), tiny).optimizer.use_ema
    averaging = config_lib.override(tiny, train={"ema_momentum": 0.995})
    optimizer = compile_model(build_model(averaging, 0), averaging).optimizer
    assert optimizer.use_ema and optimizer.ema_momentum == 0.995


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5])
def test_momentum_outside_zero_one_is_refused(momentum):
    from kits_keras import config as config_lib

    with pytest.raises(ValueError, match="ema_momentum"):
        config_lib.override(config_lib.get_config("tiny"),
                            train={"ema_momentum": momentum})
