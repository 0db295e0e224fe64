"""Regions of a label set, outputs to labels, region loss and metrics."""

import keras
import numpy as np
import pytest
from keras import ops

from kits_keras import hec
from kits_keras.config import LossConfig
from kits_keras.config import get_config
from kits_keras.config import override
from kits_keras.model import regions
from kits_keras.model.losses import RegionLoss
from kits_keras.model.losses import multi_scale_loss
from kits_keras.model.losses import region_loss
from kits_keras.model.metrics import RegionDice


def _region_maps(labels):
    """Exact region probabilities (0/1) of KiTS23 labels, channels last."""
    labels = np.asarray(labels)
    return np.stack([np.isin(labels, h.labels) for h in hec.HECS],
                    -1).astype("float32")


def test_kits23_regions_are_the_hecs_and_give_one_label_each():
    assert regions.regions("kits23") == tuple(
        (h.name, h.labels) for h in hec.HECS)
    assert regions.region_labels("kits23") == (1, 3, 2)
    assert regions.region_labels("kits19") == (1, 2)
    with pytest.raises(ValueError, match="label_set"):
        regions.regions("kits21")


def test_regions_to_labels_inverts_exact_region_maps_numpy_and_ops():
    labels = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    maps = _region_maps(labels)
    back = regions.to_labels(maps, "regions", "kits23")
    np.testing.assert_array_equal(back, labels)
    assert back.dtype == np.uint8
    traced = regions.to_labels(ops.convert_to_tensor(maps), "regions",
                               "kits23", ops)
    np.testing.assert_array_equal(ops.convert_to_numpy(traced), labels)


def test_regions_to_labels_applies_the_rule_in_order():
    # p(kidney+masses), p(masses), p(tumour) per voxel.
    p = np.array([[0.4, 0.9, 0.9],    # tumour wins over everything: 2
                  [0.6, 0.6, 0.4],    # masses, no tumour: cyst 3
                  [0.6, 0.4, 0.4],    # kidney 1
                  [0.5, 0.5, 0.5]])   # nothing above 0.5: background
    np.testing.assert_array_equal(
        regions.regions_to_labels(list(p.T), "kits23"), [2, 3, 1, 0])


def test_softmax_to_labels_is_the_argmax():
    probs = np.eye(4, dtype="float32")[[3, 0, 2, 1]]
    np.testing.assert_array_equal(
        regions.to_labels(probs, "softmax", "kits23"), [3, 0, 2, 1])


def test_region_loss_is_small_when_right_larger_when_wrong():
    labels = np.array([[[[0, 1], [2, 3]], [[3, 3], [1, 0]]]])
    right = np.clip(_region_maps(labels), 0.001, 0.999)
    wrong = right[..., ::-1]
    small = float(region_loss(labels, right))
    assert small < 0.05
    assert float(region_loss(labels, wrong)) > small + 0.2
    # Dice + BCE weighted by the config: BCE only equals its hand value.
    bce_only = LossConfig(w_dice=0.0, w_ce=1.0)
    p = np.full(labels.shape + (3,), 0.5, "float32")
    assert float(region_loss(labels, p, bce_only)) == pytest.approx(
        np.log(2.0), rel=1e-5)


def test_region_loss_refuses_wrong_channels_and_round_trips():
    with pytest.raises(ValueError, match="one channel per region"):
        region_loss(np.zeros((1, 2, 2, 2)), np.zeros((1, 2, 2, 2, 4)))
    loss = RegionLoss.from_loss_config(LossConfig(w_ce=0.5),
                                       label_set="kits19")
    clone = RegionLoss.from_config(loss.get_config())
    assert clone.loss_config == loss.loss_config
    assert clone.label_set == "kits19"


def test_multi_scale_loss_uses_the_region_loss_in_region_mode():
    labels = np.array([[[[0, 1], [2, 3]]]])
    maps = np.clip(_region_maps(labels), 0.01, 0.99)
    got = multi_scale_loss([labels], [maps], LossConfig(), "regions",
                           "kits23")
    assert float(got) == pytest.approx(float(region_loss(labels, maps)))


def test_region_dice_kits23_softmax_and_regions_hand_computed():
    truth = np.array([[1, 2, 3, 3, 0]])
    pred = np.array([[1, 3, 3, 0, 0]])
    for mode, probs in (("softmax", np.eye(4, dtype="float32")[pred]),
                        ("regions", _region_maps(pred))):
        masses = RegionDice("masses", "kits23", mode)
        tumour = RegionDice("tumour", "kits23", mode)
        kidney = RegionDice("kidney", "kits23", mode)
        for m in (masses, tumour, kidney):
            m.update_state(truth, probs)
        # masses {2,3}: truth {1,2,3}, pred {1,2} -> 2*2/5
        assert float(masses.result()) == pytest.approx(0.8)
        # tumour {2}: truth {1}, pred {} -> 0
        assert float(tumour.result()) == 0.0
        # kidney and masses: truth {0,1,2,3}, pred {0,1,2} -> 6/7
        assert float(kidney.result()) == pytest.approx(6 / 7)
        clone = RegionDice.from_config(masses.get_config())
        assert (clone.label_set, clone.output_mode) == ("kits23", mode)
    with pytest.raises(ValueError, match="masses"):
        RegionDice("masses", "kits19")


def test_unet_region_head_is_one_sigmoid_per_hec():
    from kits_keras.model.unet import build_unet

    cfg = override(get_config("kits23_tiny"),
                   model={"output_mode": "regions"})
    model = build_unet(cfg)
    assert [o.shape[-1] for o in model.outputs] == [3] * 3
    out = model(np.zeros((1, 16, 32, 32, 1), "float32"))[0]
    assert float(ops.min(out)) >= 0.0
    # Sigmoids, not a softmax: the channels do not sum to 1.
    sums = ops.convert_to_numpy(ops.sum(out, -1))
    assert not np.allclose(sums, 1.0)
    softmax = build_unet(get_config("kits23_tiny"))
    assert softmax.outputs[0].shape[-1] == 4
    assert keras.backend.backend() in ("jax", "tensorflow", "torch")
