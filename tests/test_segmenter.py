"""``from kits_keras import Segmenter``: the CLI's labels, bit for bit, from
a path, a DICOM folder, a nibabel image and an ``(array, spacing,
affine)`` tuple."""

import os
import sys

import nibabel as nib
import numpy as np
import pytest
from tests.conftest import save_cropped_ct
from tests.conftest import save_untrained_tiny_run
from click.testing import CliRunner

from kits_keras import io


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return save_untrained_tiny_run(tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture(scope="module")
def ct_file(synthetic_cases_dir, tmp_path_factory):
    return save_cropped_ct(synthetic_cases_dir, "case_00001",
                           tmp_path_factory.mktemp("ct"))


def _cli(args):
    from cli.infer import infer

    result = CliRunner().invoke(infer, args + ["--tta", "none", "--backend",
                                               "jax"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_lazy_export():
    from kits_keras import Segmenter
    from kits_keras.segmenter import Segmenter as Direct

    assert Segmenter is Direct


@pytest.mark.large  # 4 inferences (~20 s); the module's doctest runs the API
def test_nifti_path_nibabel_and_array_give_the_cli_result(run_dir, ct_file,
                                                          tmp_path):
    from kits_keras import Segmenter

    out = str(tmp_path / "cli.nii.gz")
    _cli([ct_file, "-o", out, "--model", run_dir])
    cli = io.read_labels(out)
    seg = Segmenter.load(run_dir, tta="none")
    by_path = seg(ct_file)
    assert np.array_equal(by_path.labels, cli.array)
    saved = by_path.save(str(tmp_path / "api.nii.gz"))
    assert np.array_equal(np.asarray(nib.load(saved).dataobj),
                          np.asarray(nib.load(out).dataobj))
    assert np.allclose(nib.load(saved).affine, nib.load(out).affine)
    by_image = seg(nib.load(ct_file))
    assert np.array_equal(by_image.labels, cli.array)
    volume = io.read_image(ct_file)
    by_array = seg((volume.array, volume.spacing, volume.array_affine))
    assert np.array_equal(by_array.labels, cli.array)
    report = __import__("json").load(open(str(tmp_path / "cli.json")))
    assert by_path.volumes_ml == report["volumes"]
    assert by_path.qc["flagged"] == report["qc"]["flagged"]


@pytest.mark.large  # ~25 s on 2 cores
def test_dicom_folder_gives_the_cli_result(run_dir, tmp_path):
    pytest.importorskip("highdicom")
    from kits_keras import Segmenter
    from kits_keras.dicom import write as dicom_write

    folder = str(tmp_path / "series")
    dicom_write.write_synthetic_series(folder, seed=2)
    os.remove(os.path.join(folder, io.LABELS_FILE))
    out = tmp_path / "out"
    _cli([folder, "-o", str(out), "--model", run_dir, "--output-type",
          "both"])
    result = Segmenter.load(run_dir, tta="none")(folder)
    assert np.array_equal(result.labels,
                          io.read_labels(str(out / "series.nii.gz")).array)
    seg_path = result.save(str(tmp_path / "api.dcm"))
    frames = dicom_write.read_seg(seg_path, result.series)
    assert np.array_equal(frames, dicom_write.read_seg(
        str(out / "series.dcm"), result.series))


def test_dicom_seg_needs_a_dicom_input(run_dir, ct_file, tmp_path):
    from kits_keras import Segmenter

    result = Segmenter.load(run_dir, tta="none")(ct_file)
    with pytest.raises(ValueError, match="needs a DICOM series"):
        result.save(str(tmp_path / "x.dcm"))
    assert not os.listdir(tmp_path)


def test_import_stays_light():
    import subprocess

    code = ("import sys, kits_keras; "
            "print('keras' in sys.modules, 'jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", "False"]
