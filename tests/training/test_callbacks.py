"""Tests of ``kits_keras.training.callbacks`` on a small dense model (the
U-Net's runs are in ``test_fit.py``)."""

import numpy as np
import pytest


def _tiny_fit(callbacks, epochs, learning_rate=1e-2):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    history = model.fit(x, x[:, :1], epochs=epochs, batch_size=4,
                        callbacks=callbacks, verbose=0)
    return model, history


def test_poly_schedule_decays_to_zero_by_epoch_and_logs_the_rate():
    from kits_keras.training.callbacks import PolyLearningRate

    epochs = 5
    schedule = PolyLearningRate(1e-2, epochs)
    model, history = _tiny_fit([schedule], epochs)
    expected = [1e-2 * (1 - e / epochs) ** 0.9 for e in range(epochs)]
    assert history.history["learning_rate"] == pytest.approx(expected)
    assert float(model.optimizer.learning_rate) == pytest.approx(expected[-1])
    # Strictly falling, and not yet zero during the last epoch.
    assert all(a > b for a, b in zip(expected, expected[1:]))


def test_fit_builds_the_configured_schedule():
    from kits_keras import config as config_lib
    from kits_keras.training import callbacks as cb
    from kits_keras.training.fit import make_schedule

    paper = config_lib.get_config("paper").train
    assert isinstance(make_schedule(paper), cb.ResumableReduceLROnPlateau)
    train = config_lib.get_config("tiny").train
    poly = make_schedule(train)
    assert isinstance(poly, cb.PolyLearningRate)
    assert (poly.base, poly.epochs) == (train.learning_rate, train.epochs)
    with pytest.raises(ValueError, match="lr_schedule"):
        config_lib.override(config_lib.get_config("tiny"),
                            train={"lr_schedule": "cosine"})


def test_loss_curves_drawn_every_few_epochs_and_at_the_end(tmp_path):
    import keras

    from kits_keras.training.callbacks import LossCurves

    csv_path, png = str(tmp_path / "history.csv"), tmp_path / "curves.png"
    curves = LossCurves(csv_path, str(png), every=3)
    _tiny_fit([keras.callbacks.CSVLogger(csv_path), curves], epochs=2)
    assert png.exists()  # the end of training, before the 3rd epoch
    png.unlink()
    for epoch in (0, 1):
        curves.on_epoch_end(epoch)
    assert not png.exists()
    curves.on_epoch_end(2)
    assert png.exists()
    # After a failed run it draws what it can and never masks the error.
    missing = LossCurves(str(tmp_path / "none.csv"), str(png))
    missing.draw(quiet=True)
    with pytest.raises(FileNotFoundError):
        missing.draw()
