r"""Writes ``dummy_data/``: six tiny synthetic KiTS23 cases for the test.

The kits19 dummy cases (:func:`tfds_kits19.kits19.dummy_data_generation.
make_tiny_case`: soft tissue with a kidney and, in most, a tumour), each
with a cyst (label 3, 10 HU, a fluid-like sphere of radius ~2 voxels)
painted into the kidney, under KiTS23 case numbers: 0, 1, 2, 4, 400, 404
(cases 4 and 404 are test cases by the number rule). A few kB in all. Run
from the repo root:

    python -m tfds_kits19.kits23.dummy_data_generation
"""

import os
import shutil

import numpy as np

from kits_keras import io
from kits_keras.synthetic import cases as synthetic
from tfds_kits19.kits19 import dummy_data_generation as kits19_dummy

DUMMY_DIR = os.path.join(os.path.dirname(__file__), "dummy_data")
CASE_NUMBERS = (0, 1, 2, 4, 400, 404)
CYST_HU = 10


def add_cyst(image, labels):
    """Copies of ``(image, labels)`` with a label-3 ball of ``CYST_HU`` at
    the kidney voxel nearest the kidney's centre (radius 2 voxels, within
    the kidney)."""
    image, labels = image.copy(), labels.copy()
    kidney = np.argwhere(labels == 1)
    centre = kidney[np.argmin(np.abs(kidney - kidney.mean(0)).sum(1))]
    grid = np.indices(labels.shape)
    ball = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= 4
    cyst = ball & (labels == 1)
    labels[cyst] = 3
    image[cyst] = CYST_HU
    return image, labels


def main():
    shutil.rmtree(DUMMY_DIR, ignore_errors=True)
    geometries = kits19_dummy.GEOMETRIES + kits19_dummy.GEOMETRIES[:1]
    for index, (number, (shape, spacing, has_tumour)) in enumerate(
            zip(CASE_NUMBERS, geometries)):
        image, labels = kits19_dummy.make_tiny_case(index, shape, spacing,
                                                    has_tumour)
        image, labels = add_cyst(image, labels)
        affine = synthetic.kits19_affine(spacing)
        case_dir = os.path.join(DUMMY_DIR, f"case_{number:05d}")
        io.save_nifti(os.path.join(case_dir, io.IMAGE_FILE), image, affine)
        io.save_nifti(os.path.join(case_dir, io.LABELS_FILE), labels, affine)


if __name__ == "__main__":
    main()
