"""Tests for kits_keras/inference/body_mask.py and its use by the predictor."""

import os

import numpy as np
import pytest

from kits_keras.inference import body_mask
from kits_keras import io
from kits_keras.synthetic import cases as synthetic


@pytest.mark.parametrize("seed", range(6))
def test_body_mask_holds_every_label_and_no_air(seed):
    case = synthetic.make_case(seed)
    image, labels = case.image.array, case.labels.array
    mask = body_mask.body_mask(image, case.spacing)
    assert mask.shape == image.shape and mask.dtype == bool
    assert mask[labels > 0].all()
    # The front corners of the field of view are air (the table may reach
    # the back ones).
    for corner in (np.s_[:, :4, :4], np.s_[:, :4, -4:]):
        assert (image[corner] < -700).all()
        assert not mask[corner].any()
    # Most air is outside (lungs and bowel gas are inside the body), most
    # non-air inside (the table, up to a quarter of it, is not).
    air = image < -500
    assert np.mean(mask[air]) < 0.25
    assert np.mean(mask[~air]) > 0.75


def test_table_is_not_body():
    from kits_keras.synthetic import anatomy

    for seed in range(20):
        rng = np.random.default_rng(seed)
        if anatomy.sample_table(rng) is not None:
            break
    case = synthetic.make_case(seed)
    image = case.image.array
    mask = body_mask.body_mask(image, case.spacing)
    # The table: dense voxels in the lowest (most posterior) rows.
    rows = np.nonzero((image > 50).any(axis=(0, 2)))[0]
    table_rows = image[:, rows[-1] - 1:rows[-1] + 1, :] > 50
    assert table_rows.any()
    assert not mask[:, rows[-1] - 1:rows[-1] + 1, :][table_rows].any()


@pytest.mark.large  # real KiTS19 data
def test_real_labels_inside_body(kits19_labels_dir):
    labels = synthetic.read_label_volume(
        os.path.join(kits19_labels_dir, "case_00021", io.LABELS_FILE))
    case = synthetic.make_case(3, labels=labels, case_id="case_00021")
    mask = body_mask.body_mask(case.image.array, case.spacing)
    assert mask[case.labels.array > 0].all()


def test_remove_outside_body_counts_and_clears():
    image = np.full((10, 30, 30), -1000.0, np.float32)
    image[:, 8:22, 8:22] = 40.0
    labels = np.zeros(image.shape, np.uint8)
    labels[:, 0:3, 0:3] = 2          # in air: 90 voxels
    labels[5, 0, 10:12] = 1          # in air: 2 voxels
    labels[4:6, 12:16, 12:16] = 1    # inside: kept
    removed = body_mask.remove_outside_body(labels, image, (4.0, 4.0, 4.0),
                                            slab_slices=3)
    assert removed == {1: 2, 2: 90}
    assert labels[:, 0:3, 0:3].max() == 0
    assert np.count_nonzero(labels) == 2 * 4 * 4


def _tumour_everywhere_network(batch):
    """A network gone wrong: tumour in every voxel, air included."""
    probs = np.zeros(batch.shape[:-1] + (3,), np.float32)
    probs[..., 2] = 1.0
    return probs


def test_predictor_never_puts_foreground_outside_body():
    from kits_keras.inference import predict
    from kits_keras.config import get_config
    from kits_keras.config import override
    from kits_keras.data.intensity import IntensityStats

    case = synthetic.make_case(1)
    # The fake network gives class probabilities: a softmax model.
    config = override(get_config("tiny"), infer={"tta": "none"},
                      model={"output_mode": "softmax"})
    stats = IntensityStats(clip_low=-100.0, clip_high=300.0, mean=100.0,
                           std=80.0)
    pred = predict.predict_case(case.image, _tumour_everywhere_network,
                                config, stats)
    mask = body_mask.body_mask(case.image.array, case.spacing)
    assert not pred.labels[~mask].any()
    assert pred.labels[mask].min() == 2
    removed = pred.qc["removed_outside_body_ml"]
    outside_ml = np.count_nonzero(~mask) * case.image.voxel_volume_ml
    assert removed["tumour"] == pytest.approx(outside_ml, rel=1e-3)
    assert removed["kidney"] == 0.0
