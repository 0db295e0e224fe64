"""Tests of kits_keras/data/intensity.py (foreground statistics).

The z-score of preprocessed foreground is checked with the resampling in
``test_preprocessing.py``.
"""

import numpy as np
import pytest

from kits_keras.data import intensity


def test_intensity_stats_json_round_trip(tmp_path):
    stats = intensity.IntensityStats(-79.0, 304.0, 101.5, 76.9)
    path = stats.save_json(str(tmp_path / "stats.json"))
    assert intensity.IntensityStats.load_json(path) == stats
    assert intensity.IntensityStats.from_dict(stats.to_dict()) == stats
    with pytest.raises(ValueError, match="std"):
        intensity.IntensityStats(0.0, 1.0, 0.0, 0.0)


def test_stats_need_foreground():
    with pytest.raises(ValueError, match="foreground"):
        intensity.compute_intensity_stats([(np.zeros((4, 4, 4)),
                                            np.zeros((4, 4, 4), np.uint8))])
