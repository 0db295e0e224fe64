"""Tests for kits_keras/training/validation.py and the validation summary
callback."""

import numpy as np
import pytest

from kits_keras.training import callbacks as cb
from kits_keras.config import get_config


class _Model:
    """Stands in for the Keras model the callback is attached to."""


def _summary(validator, every, epochs):
    summary = cb.ValidationSummary(window=2, volume_validator=validator,
                                   volume_every=every)
    summary.set_model(_Model())
    summary.set_params({"epochs": epochs})
    return summary


def test_volume_dice_replaces_patch_dice_on_due_epochs():
    calls = []

    def validator(model, epoch):
        calls.append(epoch)
        return {"kidney_dice": 0.2 + 0.1 * epoch, "tumour_dice": 0.1}

    summary = _summary(validator, every=3, epochs=5)
    rows = []
    for epoch in range(5):
        logs = {"val_head0_kidney_dice": 0.9, "val_head0_tumour_dice": 0.8}
        summary.on_epoch_end(epoch, logs)
        rows.append(logs)
    assert calls == [0, 3, 4]  # first, every 3rd, last
    for epoch in (1, 2):
        assert "val_dice_ma" not in rows[epoch]  # no best-model decision
        assert rows[epoch]["val_patch_kidney_dice"] == 0.9
    assert rows[3]["val_kidney_dice"] == 0.5
    assert rows[3]["val_patch_kidney_dice"] == 0.9
    assert rows[4]["val_dice"] == pytest.approx((0.6 + 0.1) / 2)
    assert rows[4]["val_dice_ma"] == pytest.approx(
        np.mean([(0.5 + 0.1) / 2, (0.6 + 0.1) / 2]))


def test_summary_resumed_from_its_state_logs_what_an_unbroken_run_logs():
    """A run stopped after epoch 3 and resumed from ``get_state`` (a new
    process: a new callback) logs the same volume Dice and moving averages
    as one that never stopped, so it picks the same best checkpoint."""

    def validator(model, epoch):
        return {"kidney_dice": 0.3 + 0.1 * epoch, "tumour_dice": 0.05 * epoch}

    def run(summary, epochs):
        rows = []
        for epoch in epochs:
            logs = {"val_head0_kidney_dice": 0.9,
                    "val_head0_tumour_dice": 0.1 * epoch}
            summary.on_epoch_end(epoch, logs)
            rows.append(logs)
        return rows

    unbroken = _summary(validator, every=2, epochs=6)
    whole = run(unbroken, range(6))
    first = _summary(validator, every=2, epochs=6)
    rows = run(first, range(3))
    state = first.get_state()
    resumed = _summary(validator, every=2, epochs=6)
    resumed.set_state(state)
    rows += run(resumed, range(3, 6))
    assert rows == whole
    assert resumed.get_state() == unbroken.get_state()
    assert [r.get("val_dice_ma") is not None for r in whole] == [
        True, False, True, False, True, True]  # first, every 2nd, last


def test_patch_dice_without_validator():
    summary = _summary(None, every=1, epochs=2)
    logs = {"val_head0_kidney_dice": 0.9, "val_head0_tumour_dice": 0.7}
    summary.on_epoch_end(0, logs)
    assert logs["val_dice"] == 0.8 and "val_patch_kidney_dice" not in logs


@pytest.mark.large  # whole-volume inference with a JAX compile (~15 s)
def test_volume_validator_scores_whole_volumes():
    from kits_keras.training import fit as training
    from kits_keras.training import validation

    config = get_config("tiny")
    model = training.build_model(config, 0)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(40, 70, 70)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[10:20, 20:40, 20:40] = 1
    validator = validation.VolumeValidator(
        [("case_a", image, labels), ("case_b", image, labels)], config)
    scores = validator(model, 0)
    assert set(scores) == {"kidney_dice", "tumour_dice", "dice"}
    assert set(validator.last_cases) == {"case_a", "case_b"}
    # The untrained network's argmax, scored as evaluate would.
    from kits_keras import evaluate
    from kits_keras.inference import sliding_window as sw
    from kits_keras.model.unet import full_resolution_model

    net = full_resolution_model(model)
    probs = sw.sliding_window(
        image, lambda b: np.asarray(net(b, training=False)),
        config.data.patch_size, overlap=config.infer.overlap,
        batch_size=config.infer.batch_size).probabilities
    from kits_keras.model.regions import to_labels

    expected = evaluate.kits_scores(
        to_labels(probs, config.model.output_mode, config.data.label_set),
        labels)
    assert scores["kidney_dice"] == expected["kidney_dice"]
    assert scores["tumour_dice"] == expected["tumour_dice"]
