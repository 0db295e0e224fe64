"""Tests of kits_keras.data.resample_patch, eagerly and inside Dataset.map.

The coordinates and gathers are also exercised through
:func:`kits_keras.data.augment.spatial_transform` in ``test_augment.py``
(exact crops, rot90, mm rotations, corners read from the volume).
"""

import numpy as np

from kits_keras.data import resample_patch
from tests.data.test_augment import run_both
from tests.data.test_augment import seed


def test_elastic_displacement_stays_within_bound():
    size = (12, 32, 32)

    def fn(s):
        return resample_patch.elastic_displacement(size, 1e5, 4.0, 3.0, s)

    for out in run_both(fn, seed(3)):
        length = np.linalg.norm(out, axis=-1)
        assert out.shape == size + (3,)
        assert length.max() <= 3.0 + 1e-4
        assert length.max() > 1.5  # really deformed
    small = resample_patch.elastic_displacement(size, 900.0, 9.0, 8.0, seed(3))
    length = np.linalg.norm(small.numpy(), axis=-1)
    # batchgenerators' alpha 900, sigma 9: a few voxels.
    assert 0.3 < length.mean() < 8.0
