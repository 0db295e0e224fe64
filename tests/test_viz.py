"""Tests for kits_keras/viz.py: orthogonal-view PNGs."""

import os

import numpy as np
import pytest
from matplotlib import image as mpimg

from kits_keras import viz


def _volume():
    image = np.full((20, 40, 50), -1000.0, np.float32)
    image[:, 5:35, 5:45] = 40.0
    labels = np.zeros(image.shape, np.uint8)
    labels[5:15, 10:20, 10:20] = 1
    labels[12:14, 25:30, 30:36] = 2  # small tumour away from the kidney
    labels[2:4, 30:32, 40:42] = 2  # smaller second tumour
    return image, labels


def test_default_center_goes_through_largest_tumour():
    image, labels = _volume()
    z, y, x = viz.default_center(image.shape, labels)
    assert labels[z, y, x] == 2 and 12 <= z < 14 and 25 <= y < 30
    labels[labels == 2] = 0
    assert labels[viz.default_center(image.shape, labels)] == 1
    assert viz.default_center(image.shape, None) == (10, 20, 25)


def test_png_written_with_outlines(tmp_path):
    image, labels = _volume()
    path = str(tmp_path / "views.png")
    viz.save_orthogonal_views(
        path, image, (3.0, 0.8, 0.8),
        overlays=[(labels, viz.LABEL_COLOURS, "label")], title="t")
    pixels = mpimg.imread(path)[..., :3]
    # Red tumour outline (#ff3030) is drawn somewhere.
    red = (pixels[..., 0] > 0.9) & (pixels[..., 1] < 0.4) & (
        pixels[..., 2] < 0.4)
    assert red.sum() > 10
    assert os.listdir(tmp_path) == ["views.png"]


def test_auto_window_for_normalised_images(tmp_path):
    image, _ = _volume()
    normalised = (image - image.mean()) / image.std()
    path = viz.save_orthogonal_views(str(tmp_path / "n.png"), normalised,
                                     (1.0, 1.0, 1.0), window=None)
    pixels = mpimg.imread(path)[..., :3]
    assert pixels.std() > 0.1
    with pytest.raises(ValueError, match="3-D"):
        viz.save_orthogonal_views(str(tmp_path / "bad.png"), image[0],
                                  (1.0, 1.0))
    assert not os.path.exists(tmp_path / "bad.png")
