"""DICOM series in (kits_keras.dicom.read), SEG out (kits_keras.dicom.write).

The real series (``../shared/data/real-ct-dicom``: 20 JPEG 2000 slices, and
the grid of TotalSegmentator's own conversion of it) is read onto the
reference grid; synthetic series (``kits-keras synth --format dicom``)
cover storage orders, compression and every refusal.
"""

import os
import sys

import nibabel as nib
import numpy as np
import pytest
from tests.conftest import save_untrained_tiny_run

from kits_keras import io
from tests.cli_harness import run_cli
from tests.cli_harness import snapshot

pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from kits_keras.dicom import read as dicom  # noqa: E402
from kits_keras.dicom import write as dicom_write  # noqa: E402

REAL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__))))), "shared", "data",
    "real-ct-dicom")
# Affine agreement with the reference conversion, mm (and direction
# cosines x spacing): far below a voxel.
AFFINE_TOLERANCE_MM = 1e-3


@pytest.fixture(scope="module")
def real_dir():
    if not os.path.isdir(REAL):
        pytest.skip(f"real DICOM series not found at {REAL}")
    return REAL


def test_real_series_lands_on_the_reference_grid(real_dir, tmp_path):
    volume = dicom.read_folder(real_dir)
    out = str(tmp_path / "ct.nii.gz")
    io.save_like(out, volume.array, volume)
    ours = nib.load(out)
    ref = nib.load(os.path.join(real_dir, "reference_geometry.nii.gz"))
    assert ours.shape == ref.shape == (512, 512, 20)
    assert np.abs(ours.affine - ref.affine).max() < AFFINE_TOLERANCE_MM
    assert nib.aff2axcodes(ours.affine) == ("L", "A", "S")
    hu = np.asarray(ours.dataobj)
    labels = np.asarray(ref.dataobj)
    # TotalSegmentator's label 5 is the liver (contrast-enhanced).
    assert 40 <= np.median(hu[labels == 5]) <= 150
    assert -1030 <= np.median(hu[hu < -500]) <= -950  # air
    assert volume.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))


@pytest.fixture(scope="module")
def head_first(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("dicom") / "head-first")
    case = dicom_write.write_synthetic_series(folder, seed=3)
    return case, dicom.read_folder(folder)


@pytest.mark.parametrize("variant", [v for v in dicom_write.SAME_VOLUME
                                     if v != "head-first"])
def test_storage_variants_read_as_the_same_volume(variant, head_first,
                                                  tmp_path):
    case, reference = head_first
    folder = str(tmp_path / variant)
    dicom_write.write_synthetic_series(folder, seed=3, variant=variant)
    volume = dicom.read_folder(folder)
    assert np.array_equal(volume.array, reference.array)
    assert np.allclose(volume.array_affine, reference.array_affine,
                       atol=1e-4)
    assert volume.spacing == pytest.approx(reference.spacing)
    # ... which is the synthetic CT itself, in HU.
    assert np.array_equal(volume.array, np.clip(np.round(
        case.image.array), -1024, 3071))


def test_labels_written_on_the_series_grid(head_first, tmp_path):
    case, volume = head_first
    folder = str(tmp_path / "s")
    dicom_write.write_synthetic_series(folder, seed=3)
    labels = io.read_labels(os.path.join(folder, io.LABELS_FILE))
    assert np.array_equal(labels.array, case.labels.array)
    io.check_same_grid(volume, labels)


REFUSALS = {
    "gantry-tilt": ("IM_0001.dcm", "gantry tilt"),
    "irregular-spacing": (None, "irregular slice spacing"),
    "missing-slice": (None, "missing slice"),
    "mr": ("IM_0001.dcm", "modality MR"),
    "localizer": ("IM_0000.dcm", "localizer"),
    "mixed": (None, "two acquisitions"),
}


@pytest.mark.parametrize("variant", sorted(REFUSALS))
def test_each_defect_is_refused_naming_a_file(variant, tmp_path):
    folder = str(tmp_path / variant)
    dicom_write.write_synthetic_series(folder, seed=1, variant=variant)
    with pytest.raises(io.CaseError) as err:
        dicom.read_folder(folder)
    message = str(err.value)
    name, words = REFUSALS[variant]
    assert "\n" not in message and words in message
    assert message.startswith(os.path.join(folder, name or "IM_"))


def test_a_missing_extra_is_named(tmp_path, monkeypatch):
    from kits_keras.inference import jobs

    folder = str(tmp_path / "s")
    dicom_write.write_synthetic_series(folder, seed=0)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    (found,) = jobs.find_inputs([folder])
    assert found.path is None and "pip install 'kits-keras[dicom]'" in (
        found.error)


def test_a_single_dicom_file_asks_for_its_folder(tmp_path):
    from kits_keras.inference import jobs

    folder = str(tmp_path / "s")
    dicom_write.write_synthetic_series(folder, seed=0)
    (found,) = jobs.find_inputs([os.path.join(folder, "IM_0001.dcm")])
    assert "pass the folder of its series" in found.error


def test_several_series_are_several_cases(tmp_path):
    from kits_keras.inference import jobs

    for i in range(2):
        dicom_write.write_synthetic_series(
            str(tmp_path / "in" / f"case_{i:05d}"), seed=i)
    found = jobs.find_inputs([str(tmp_path / "in")])
    assert [f.case_id for f in found] == ["case_00000", "case_00001"]
    planned = jobs.plan_jobs(found)
    assert planned[0].output_path == str(tmp_path / "in" /
                                      "case_00000_seg.nii.gz")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_untrained_tiny_run(tmp_path_factory.mktemp("runs") / "tiny")


@pytest.mark.large  # ~40 s on 2 cores
def test_infer_refuses_every_defect_and_segments_the_good_series(
        model_dir, tmp_path):
    """One CLI run: each bad series is one line naming its file, exit 1,
    no output for it; the good series is segmented (NIfTI + DICOM SEG)
    and its SEG reads back as the NIfTI's voxels."""
    data = tmp_path / "in"
    for seed, variant in enumerate(sorted(REFUSALS)):
        dicom_write.write_synthetic_series(str(data / variant), seed=seed,
                                           variant=variant)
    dicom_write.write_synthetic_series(str(data / "good"), seed=9)
    before = snapshot(str(data))
    out = tmp_path / "out"
    result = run_cli(["infer", str(data), "-o", str(out), "--model",
                      model_dir, "--tta", "none", "--output-type", "both",
                      "--backend", "jax"])
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for variant, (_, words) in REFUSALS.items():
        lines = [line for line in result.error_lines
                 if f"{data / variant}{os.sep}" in line]
        assert lines and all(words in line for line in lines), (variant,
                                                                lines)
        assert not any(name.startswith(variant) for name in os.listdir(out))
    assert snapshot(str(data)) == before
    assert sorted(os.listdir(out)) == ["good.dcm", "good.json",
                                       "good.nii.gz", "summary.json"]
    series, _ = dicom.find_series(str(data / "good"))
    volume = dicom.read_series(series[0])
    labels = io.read_labels(str(out / "good.nii.gz"))
    io.check_same_grid(volume, labels)
    frames = dicom_write.read_seg(str(out / "good.dcm"), series[0])
    assert np.array_equal(frames, dicom_write.frames_of(labels.array,
                                                        volume))


def test_seg_codes_and_references(head_first, tmp_path):
    import highdicom as hd

    case, volume = head_first
    folder = str(tmp_path / "s")
    dicom_write.write_synthetic_series(folder, seed=3)
    (series,), _ = dicom.find_series(folder)
    path = dicom_write.save_seg(str(tmp_path / "seg.dcm"),
                                case.labels.array, volume, series)
    seg = hd.seg.segread(path)
    kidney, mass = (seg.get_segment_description(n) for n in (1, 2))
    assert kidney.segmented_property_type.value == "64033007"
    assert mass.segmented_property_type.value == "4147007"
    assert mass.anatomic_regions[0].value == "64033007"
    assert seg.SeriesInstanceUID != series.uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.uid
    frames = dicom_write.read_seg(path, series)
    assert np.array_equal(frames, dicom_write.frames_of(case.labels.array,
                                                        volume))


def test_synth_cli_writes_dicom(tmp_path):
    from click.testing import CliRunner

    from cli.synth import synth

    result = CliRunner().invoke(synth, [str(tmp_path / "o"), "--format",
                                        "dicom", "--cases", "1",
                                        "--dicom-variant", "rle"])
    assert result.exit_code == 0, result.output
    volume = dicom.read_folder(str(tmp_path / "o" / "case_00000"))
    assert volume.array.ndim == 3
