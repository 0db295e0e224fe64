"""Tests of kits_keras.inference.aggregate."""

import pytest

from kits_keras.inference import sliding_window as sw
from kits_keras.inference.aggregate import Aggregator


def test_aggregator_refuses_tiles_out_of_slice_order():
    # The slab-wise normalisation divides slices as soon as no later tile
    # reaches them; tiles in another order would leave some undivided.
    patch = (4, 4, 4)
    steps = [[0, 4], [0], [0]]
    tiles = sw._tiles_from_steps(steps, patch)
    factors = sw._inverse_weight_factors((8, 4, 4), patch, 0.125, steps)
    gauss = sw.gaussian_importance_map(patch)
    Aggregator((8, 4, 4), gauss, 1, None, factors, tiles)
    with pytest.raises(ValueError, match="order"):
        Aggregator((8, 4, 4), gauss, 1, None, factors, tiles[::-1])
