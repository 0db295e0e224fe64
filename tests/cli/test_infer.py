"""``kits-keras infer`` end to end with a tiny real (untrained) model."""

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from tests.conftest import save_untrained_tiny_run
from click.testing import CliRunner

from kits_keras import io


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """A runs folder holding one run with an untrained tiny U-Net."""
    root = tmp_path_factory.mktemp("runs")
    save_untrained_tiny_run(root / "20260101-000000-tiny")
    return str(root)


@pytest.fixture(scope="module")
def small_cts(synthetic_cases_dir, tmp_path_factory):
    """Two synthetic CTs cropped to a few network tiles (speed: the CLI
    behaviour, not the segmentation, is under test here)."""
    folder = tmp_path_factory.mktemp("small_cts")
    paths = []
    for case in ("case_00000", "case_00001"):
        ct = io.read_image(os.path.join(synthetic_cases_dir, case,
                                        io.IMAGE_FILE))
        crop = ct.array[:24, 16:112, 16:112]
        path = str(folder / f"{case}.nii.gz")
        io.save_nifti(path, crop, ct.affine, ct.header, ct.orientation)
        paths.append(path)
    return paths


@pytest.fixture
def ct_file(small_cts, tmp_path):
    path = tmp_path / "ct.nii.gz"
    shutil.copy(small_cts[0], path)
    return str(path)


def invoke(args, runs_root=None):
    from cli.infer import infer

    env = {"KITS_KERAS_RUNS": runs_root} if runs_root else {}
    return CliRunner().invoke(infer, args, env=env, catch_exceptions=False)


@pytest.mark.large  # three inferences with a JAX compile each (~30 s)
def test_default_output_beside_input_and_latest_run(ct_file, runs_root,
                                                    caplog):
    caplog.set_level("INFO")
    result = invoke([ct_file, "--tta", "none", "--preview"], runs_root)
    assert result.exit_code == 0, result.output
    seg_path = ct_file.replace("ct.nii.gz", "ct_seg.nii.gz")
    assert os.path.isfile(seg_path)
    assert "Using the latest finished run" in caplog.text
    assert runs_root in caplog.text
    seg, ct = nib.load(seg_path), nib.load(ct_file)
    assert seg.shape == ct.shape
    assert np.allclose(seg.affine, ct.affine)
    assert np.asarray(seg.dataobj).dtype == np.uint8
    report = json.loads(open(ct_file.replace(".nii.gz", "_seg.json")).read())
    assert set(report["volumes"]) == {"kidney_ml", "tumour_ml",
                                      "kidney_and_tumour_ml"}
    assert report["qc"]["mirroring_disagreement"] is None  # --tta none
    assert report["timings_s"]["total"] > 0
    # What ran the network on this host, and why.
    assert report["runtime"]["backend"] in ("tensorflow", "jax")
    assert report["runtime"]["why"]
    assert os.path.getsize(ct_file.replace(".nii.gz", "_seg.png")) > 1000
    # Existing output: refused, untouched; --overwrite replaces it.
    before = os.path.getmtime(seg_path)
    result = invoke([ct_file, "--tta", "none"], runs_root)
    assert result.exit_code == 1
    assert "exists; pass --overwrite" in result.output
    assert os.path.getmtime(seg_path) == before
    result = invoke([ct_file, "--tta", "flip", "--overwrite",
                     "--save-probabilities"], runs_root)
    assert result.exit_code == 0, result.output
    report = json.loads(open(ct_file.replace(".nii.gz", "_seg.json")).read())
    assert report["qc"]["mirroring_disagreement"] is not None
    probs = np.load(ct_file.replace(".nii.gz", "_seg_probabilities.npz"))
    # tiny: one sigmoid per region, named.
    assert probs["probabilities"].shape[-1] == 2
    assert probs["channels"].tolist() == ["kidney", "tumour"]


def test_no_model_says_how_to_get_one(ct_file, tmp_path):
    empty = tmp_path / "no_runs"
    empty.mkdir()
    result = invoke([ct_file], str(empty))
    assert result.exit_code == 1
    assert "kits-keras fit" in result.output
    assert "kits-keras demo" in result.output
    assert not os.path.exists(ct_file.replace(".nii.gz", "_seg.nii.gz"))


@pytest.mark.large  # an infer process segmenting a batch
def test_batch_bad_file_reported_others_finish(small_cts, runs_root,
                                               tmp_path):
    inputs = tmp_path / "in"
    (inputs / "cases").mkdir(parents=True)
    for path in small_cts:
        shutil.copy(path, inputs / "cases")
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b not a nifti")
    out = tmp_path / "out"
    result = invoke([str(inputs / "cases"), str(inputs / "broken.nii.gz"),
                     str(inputs / "missing.nii.gz"), "-o", str(out),
                     "--model", runs_root + "/20260101-000000-tiny",
                     "--tta", "none", "--no-postprocess"])
    assert result.exit_code == 1
    assert "FAILED broken" in result.output
    assert "missing.nii.gz: file not found" in result.output
    assert "2 of 4 inputs failed" in result.output
    for path in small_cts:
        seg = io.read_labels(str(out / os.path.basename(path)))
        assert seg.array.shape == io.read_image(path).array.shape
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["cases"]) == 2 and len(summary["failures"]) == 2
    assert not os.path.exists(out / "broken.nii.gz")
