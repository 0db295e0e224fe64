import numpy as np
import pytest

from kits_keras.model.metrics import RegionDice


def _probs(labels):
    return np.eye(3, dtype="float32")[np.asarray(labels)]


def test_region_dice_hand_computed_and_pooled_over_batches():
    kidney = RegionDice("kidney")
    tumour = RegionDice("tumour")
    # Batch 1: truth 0 2 1 1, prediction 0 2 2 0.
    # Batch 2: truth 2 2, prediction 2 1.
    for truth, pred in (([[0, 2, 1, 1]], [[0, 2, 2, 0]]),
                        ([[2, 2]], [[2, 1]])):
        kidney.update_state(np.array(truth), _probs(pred))
        tumour.update_state(np.array(truth), _probs(pred))
    # kidney (label > 0): truth {1,2,3,4,5}, pred {1,2,4,5} -> 2*4/(5+4)
    assert float(kidney.result()) == pytest.approx(8 / 9, abs=1e-6)
    # tumour (== 2): truth {1,4,5}, pred {1,2,4} -> 2*2/(3+3)
    assert float(tumour.result()) == pytest.approx(4 / 6, abs=1e-6)


def test_region_dice_absent_region_is_one_and_config_round_trips():
    m = RegionDice("tumour")
    m.update_state(np.zeros((1, 4)), _probs([[0, 1, 1, 0]]))
    assert float(m.result()) == 1.0
    clone = RegionDice.from_config(m.get_config())
    assert clone.region == "tumour" and clone.name == "tumour_dice"
    with pytest.raises(ValueError, match="region"):
        RegionDice("liver")
