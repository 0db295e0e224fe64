r"""Writes ``dummy_data/``: five tiny synthetic KiTS19 cases for the test.

Each case is a ``case_XXXXX/`` folder with ``imaging.nii.gz`` (int16 HU) and
``segmentation.nii.gz`` (uint8), 6-10 slices of 20-28 px, so the whole folder
stays far below 1 MB. An ellipse of soft tissue (40 HU) with noise holds a
kidney (label 1, 180 HU) with a tumour (label 2, 90 HU) in all but one case;
geometry differs per case (thick, thin, non-square). Run from the repo root:

    python -m tfds_kits19.kits19.dummy_data_generation
"""

import os
import shutil

import numpy as np

from kits_keras import io
from kits_keras.synthetic import cases as synthetic

DUMMY_DIR = os.path.join(os.path.dirname(__file__), "dummy_data")
# (shape (z, y, x), spacing mm (z, y, x), has_tumour)
GEOMETRIES = (
    ((8, 24, 24), (5.0, 3.0, 3.0), True),
    ((10, 20, 28), (4.0, 3.5, 3.0), True),
    ((6, 24, 24), (6.0, 3.2, 3.2), False),
    ((10, 22, 22), (3.0, 3.6, 3.6), True),
    ((8, 26, 20), (4.5, 2.8, 3.4), True),
)


def make_tiny_case(index, shape, spacing, has_tumour):
    """``(image int16 HU, labels uint8)`` of one tiny case."""
    rng = np.random.default_rng(index)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape],
                          indexing="ij")
    centre = [n / 2 - 0.5 for n in shape]
    body = ((y - centre[1]) / (0.45 * shape[1])) ** 2 + (
        (x - centre[2]) / (0.45 * shape[2])) ** 2 < 1
    image = np.where(body, 40.0, -1000.0) + rng.normal(0, 15, shape)
    labels = np.zeros(shape, np.uint8)
    kidney = sum(((c - m - d) / r) ** 2 for c, m, d, r in zip(
        (z, y, x), centre, (0, 1, -shape[2] / 5),
        (shape[0] / 3, shape[1] / 5, shape[2] / 7))) < 1
    labels[kidney] = 1
    image[kidney] = 180 + rng.normal(0, 15, int(kidney.sum()))
    if has_tumour:
        tumour = kidney & (x > centre[2] - shape[2] / 5 + 1)
        labels[tumour] = 2
        image[tumour] = 90 + rng.normal(0, 15, int(tumour.sum()))
    return np.round(image).astype(np.int16), labels


def main():
    shutil.rmtree(DUMMY_DIR, ignore_errors=True)
    for index, (shape, spacing, has_tumour) in enumerate(GEOMETRIES):
        image, labels = make_tiny_case(index, shape, spacing, has_tumour)
        affine = synthetic.kits19_affine(spacing)
        case_dir = os.path.join(DUMMY_DIR, f"case_{index:05d}")
        io.save_nifti(os.path.join(case_dir, io.IMAGE_FILE), image, affine)
        io.save_nifti(os.path.join(case_dir, io.LABELS_FILE), labels, affine)


if __name__ == "__main__":
    main()
