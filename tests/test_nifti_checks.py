"""Tests for kits_keras/nifti_checks.py: the limits checked on a NIfTI
header before any voxel is read (files that break them, through the CLI:
tests/cli/test_bad_volumes.py)."""

import nibabel as nib
import numpy as np
import pytest

from kits_keras import files
from kits_keras import nifti_checks
from kits_keras.synthetic.cases import kits19_affine

SPACING = (3.0, 0.8, 0.7)


def test_limits_are_checked_on_the_header_alone():
    """The documented limits, checked before any voxel is read (the CLI
    table is tests/cli/test_bad_volumes.py)."""
    def header(shape, dtype=np.int16):
        h = nib.Nifti1Header()
        h.set_data_shape(shape)
        h.set_data_dtype(dtype)
        h.set_sform(kits19_affine(SPACING), code="aligned")
        return h

    # 2**29 voxels: accepted.
    nifti_checks.check_header("f", header((1024, 1024, 512)))
    nifti_checks.check_header("f", header((1059, 512, 512, 1)))
    for shape, message in [((1024, 1024, 513), "over the limit"),
                           ((4097, 2, 2), "1 to 4096"),
                           ((8, 8, 8, 2), "3-D")]:
        with pytest.raises(files.CaseError, match=message):
            nifti_checks.check_header("f", header(shape))
    with pytest.raises(files.CaseError, match="unsupported voxel type"):
        nifti_checks.check_header("f", header((4, 4, 4), np.complex64))
    for spacing in [(0.1, 0.1, 0.1), (20.0, 20.0, 20.0), (5.0, 0.4, 0.4)]:
        nifti_checks.check_geometry("f", kits19_affine(spacing), (4, 4, 4))
    for spacing in [(0.09, 1.0, 1.0), (21.0, 1.0, 1.0)]:
        with pytest.raises(files.CaseError, match="plausible 0.1 to 20 mm"):
            nifti_checks.check_geometry("f", kits19_affine(spacing), (4, 4, 4))
    with pytest.raises(files.CaseError, match="extent"):
        nifti_checks.check_geometry("f", kits19_affine((5.0, 1.0, 1.0)),
                                    (601, 4, 4))
