"""Inputs of ``kits-keras infer`` (kits_keras.inference.jobs): what is a
case, and what must not be taken for a CT."""

import os
import shutil

import numpy as np
import pytest

from kits_keras import io
from kits_keras.inference import jobs
from kits_keras.synthetic.cases import kits19_affine


def test_label_map_is_refused(tmp_path):
    # e.g. a TotalSegmentator multilabel file (117 classes) passed as CT.
    labels = np.zeros((6, 32, 32), np.uint8)
    labels[2:4, 5:20, 5:20] = 5
    labels[2:4, 22:30, 22:30] = 117
    path = str(tmp_path / "totalseg.nii.gz")
    io.save_nifti(path, labels, kits19_affine((3.0, 1.0, 1.0)))
    job = jobs.Job("totalseg", path, str(tmp_path / "out.nii.gz"))
    with pytest.raises(io.CaseError, match="totalseg.nii.gz: looks like a "
                       "label map"):
        jobs.read_input(job)


def test_ct_is_not_a_label_map(synthetic_cases_dir, tmp_path):
    path = os.path.join(synthetic_cases_dir, "case_00000", io.IMAGE_FILE)
    job = jobs.Job("case_00000", path, str(tmp_path / "out.nii.gz"))
    assert jobs.read_input(job).array.min() < -500


def test_folder_of_dicom_and_nifti_is_ambiguous(tmp_path):
    pytest.importorskip("pydicom")
    from kits_keras.dicom import write  # noqa: F401  (the extra is there)

    real = os.path.join(os.path.dirname(io.__file__), "..", "..", "shared",
                        "data", "real-ct-dicom")
    if not os.path.isdir(real):
        pytest.skip(f"{real} absent")
    folder = tmp_path / "series"
    shutil.copytree(real, folder)  # its DICOM slices and a NIfTI
    found = jobs.find_inputs([str(folder)])
    assert len(found) == 1 and found[0].path is None
    assert "both DICOM files and NIfTI files" in found[0].error
    assert str(folder) in found[0].error
