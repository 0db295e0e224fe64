"""Tests for kits_keras/io.py: reading, validating and writing cases."""

import gzip
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import main
from kits_keras import io
from kits_keras.synthetic.cases import kits19_affine

SPACING = (3.0, 0.8, 0.7)


def _write(path, array, affine=None, dtype=None):
    """Writes a file-layout array as NIfTI (no kits_keras involved)."""
    affine = kits19_affine(SPACING) if affine is None else affine
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(img, path)
    return path


def _case(folder, name="case_00000", image=None, labels=None, **kw):
    """A tiny valid KiTS19 case folder; override image/labels to break it."""
    rng = np.random.default_rng(0)
    shape = (6, 10, 12)
    if image is None:
        image = rng.uniform(-1000, 400, shape).astype(np.float32)
    if labels is None:
        labels = np.zeros(shape, np.uint8)
        labels[2:4, 3:6, 3:7] = 1
        labels[3, 4, 4] = 2
    case_dir = os.path.join(folder, name)
    _write(os.path.join(case_dir, io.IMAGE_FILE), image, kw.get("affine"))
    _write(os.path.join(case_dir, io.LABELS_FILE), labels,
           kw.get("labels_affine"), dtype=np.uint8)
    return case_dir


def test_load_valid_case(tmp_path):
    case = io.load_case(_case(str(tmp_path)))
    assert case.case_id == "case_00000"
    assert case.image.array.shape == (6, 10, 12)
    assert case.image.array.dtype == np.float32
    assert case.labels.array.dtype == np.uint8
    np.testing.assert_allclose(case.spacing, SPACING)
    assert set(np.unique(case.labels.array)) == {0, 1, 2}


def _bad_cases(folder):
    """(description, case_dir, file the error must name) per bad input."""
    rng = np.random.default_rng(1)
    out = []
    d = _case(folder, "case_00001")
    path = os.path.join(d, io.IMAGE_FILE)
    with open(path, "wb") as f:
        f.write(b"this is not a NIfTI file at all" * 20)
    out.append(("unreadable", d, path))

    d = _case(folder, "case_00002")
    path = os.path.join(d, io.LABELS_FILE)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    out.append(("truncated", d, path))

    d = _case(folder, "case_00003",
              image=rng.normal(size=(6, 10, 12, 2)).astype(np.float32))
    out.append(("4-D", d, os.path.join(d, io.IMAGE_FILE)))

    d = _case(folder, "case_00004", image=np.zeros((10, 12), np.float32))
    out.append(("2-D", d, os.path.join(d, io.IMAGE_FILE)))

    d = _case(folder, "case_00005", labels=np.zeros((6, 10, 11), np.uint8))
    out.append(("shape mismatch", d, os.path.join(d, io.LABELS_FILE)))

    d = _case(folder, "case_00006",
              labels_affine=kits19_affine((2.0, 0.8, 0.7)))
    out.append(("affine mismatch", d, os.path.join(d, io.LABELS_FILE)))

    labels = np.zeros((6, 10, 12), np.uint8)
    labels[1, 1, 1] = 3
    d = _case(folder, "case_00007", labels=labels)
    out.append(("label 3", d, os.path.join(d, io.LABELS_FILE)))

    image = np.zeros((6, 10, 12), np.float32)
    image[0, 0, 0] = np.nan
    image[1, 0, 0] = np.inf
    d = _case(folder, "case_00008", image=image)
    out.append(("non-finite", d, os.path.join(d, io.IMAGE_FILE)))

    d = _case(folder, "case_00009")
    os.remove(os.path.join(d, io.LABELS_FILE))
    out.append(("missing labels", d, os.path.join(d, io.LABELS_FILE)))
    return out


def test_every_bad_input_raises_case_error_naming_the_file(tmp_path):
    for what, case_dir, bad_file in _bad_cases(str(tmp_path)):
        with pytest.raises(io.CaseError) as err:
            io.load_case(case_dir)
        message = str(err.value)
        assert message.startswith(bad_file), (what, message)
        assert "\n" not in message, what


def test_float_labels_that_are_not_integers(tmp_path):
    labels = np.zeros((4, 5, 6), np.float32)
    labels[0, 0, 0] = 1.5
    path = _write(str(tmp_path / "seg.nii.gz"), labels)
    with pytest.raises(io.CaseError, match="integers"):
        io.read_labels(path)
    labels[0, 0, 0] = -1.0
    _write(path, labels)
    with pytest.raises(io.CaseError, match=r"\[-1\] outside"):
        io.read_labels(path)


def test_missing_and_folder_paths(tmp_path):
    with pytest.raises(io.CaseError, match="file not found"):
        io.read_image(str(tmp_path / "nope.nii.gz"))
    with pytest.raises(io.CaseError, match="is a folder"):
        io.read_image(str(tmp_path))
    with pytest.raises(io.CaseError, match="case folder not found"):
        io.load_case(str(tmp_path / "case_00000"))


def test_truncated_gzip_of_image_is_caught(tmp_path):
    path = _write(str(tmp_path / "img.nii.gz"),
                  np.random.default_rng(0).normal(size=(20, 30, 40)))
    raw = gzip.open(path).read()
    with gzip.open(path, "wb") as f:  # valid gzip stream, short payload
        f.write(raw[: len(raw) - 1000])
    with pytest.raises(io.CaseError, match="truncated: holds"):
        io.read_image(path)


def _label_source(tmp_path, synthetic_cases_dir, corrupt):
    """Two label folders for ``synth --labels-from``; the 2nd one broken."""
    src = tmp_path / "labels"
    for name in ("case_00000", "case_00001"):
        os.makedirs(src / name)
        shutil.copy(os.path.join(synthetic_cases_dir, name, io.LABELS_FILE),
                    src / name / io.LABELS_FILE)
    bad = str(src / "case_00001" / io.LABELS_FILE)
    corrupt(bad)
    return str(src), bad


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _garbage(path):
    open(path, "wb").write(b"garbage" * 50)


def _value_4(path):
    # 4: no label of KiTS19 nor KiTS23 (3 = cyst is read by synth).
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 4
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)


def _four_d(path):
    img = nib.load(path)
    data = np.stack([np.asarray(img.dataobj)] * 2, axis=-1)
    nib.save(nib.Nifti1Image(data, img.affine), path)


@pytest.mark.parametrize("corrupt", [_truncate, _garbage, _value_4, _four_d])
def test_cli_bad_label_file_one_line_exit_1_no_output(
        tmp_path, synthetic_cases_dir, corrupt):
    src, bad = _label_source(tmp_path, synthetic_cases_dir, corrupt)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["synth", str(out), "--labels-from", src])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith(f"Error: {bad}: "), result.output
    assert len([ln for ln in lines if ln.startswith("Error")]) == 1
    assert "Traceback" not in result.output
    # The good first case was synthesised, but nothing reached OUT_DIR,
    # not even the folder the run had created.
    assert not out.exists()


def test_cli_missing_labels_folder(tmp_path):
    missing = str(tmp_path / "nowhere")
    result = CliRunner().invoke(
        main, ["synth", str(tmp_path / "out"), "--labels-from", missing])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {missing}: folder not found"
    assert not os.path.exists(tmp_path / "out")


def test_save_nifti_failure_keeps_previous_file(tmp_path):
    case = io.load_case(_case(str(tmp_path)))
    target = str(tmp_path / "pred.nii.gz")
    io.save_like(target, case.labels.array, case.labels)
    before = open(target, "rb").read()
    with pytest.raises(ValueError):
        io.save_like(target, np.zeros((2, 2, 2), np.uint8), case.labels)
    assert open(target, "rb").read() == before


def test_round_trip_keeps_affine_header_dtype(tmp_path):
    case = io.load_case(_case(str(tmp_path)))
    out = str(tmp_path / "copy" / "seg.nii.gz")
    io.save_like(out, case.labels.array, case.labels)
    back = io.read_labels(out)
    np.testing.assert_array_equal(back.array, case.labels.array)
    np.testing.assert_allclose(back.affine, case.labels.affine)
    assert nib.load(out).get_data_dtype() == np.uint8
    assert back.header["pixdim"].tolist() == case.labels.header[
        "pixdim"].tolist()
    assert back.header.get_sform(coded=True)[1] == case.labels.header\
        .get_sform(coded=True)[1]
    # Float image: dtype and values survive too.
    out_img = str(tmp_path / "copy" / "img.nii.gz")
    io.save_like(out_img, case.image.array, case.image)
    np.testing.assert_array_equal(io.read_image(out_img).array,
                                  case.image.array)
    assert nib.load(out_img).get_data_dtype() == np.float32


def test_ras_nifti_is_reoriented_and_written_back_identically(tmp_path):
    rng = np.random.default_rng(0)
    nx, ny, nz = 9, 7, 5
    file_array = rng.integers(0, 3, (nx, ny, nz)).astype(np.uint8)
    affine = np.diag([0.7, 0.8, 3.0, 1.0])  # RAS, (x, y, z) on disk
    affine[:3, 3] = (-10.0, 20.0, 30.0)
    src = _write(str(tmp_path / "xyz.nii.gz"), file_array, affine)
    volume = io.read_labels(src)
    # RAS -> KiTS19's IPL: transposed *and* flipped on every axis.
    assert volume.orientation == ((2, -1), (1, -1), (0, -1))
    assert volume.array.shape == (nz, ny, nx)
    assert volume.array.flags.c_contiguous
    np.testing.assert_allclose(volume.spacing, (3.0, 0.8, 0.7))
    np.testing.assert_array_equal(
        volume.array, file_array.transpose(2, 1, 0)[::-1, ::-1, ::-1])
    assert nib.aff2axcodes(volume.array_affine) == io.KITS19_ORIENTATION
    out = str(tmp_path / "back.nii.gz")
    io.save_like(out, volume.array, volume)
    img = nib.load(out)
    np.testing.assert_array_equal(np.asarray(img.dataobj), file_array)
    np.testing.assert_allclose(img.affine, affine)
    assert img.shape == (nx, ny, nz)


def test_other_orientation_on_request(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = _write(str(tmp_path / "a.nii.gz"), array)  # KiTS19 layout
    volume = io.read_volume(path, None, orientation="SAR")
    np.testing.assert_array_equal(volume.array, array[::-1, ::-1, ::-1])
    assert io.read_volume(path, None).orientation == io.FILE_LAYOUT
    with pytest.raises(ValueError, match="3 axis codes"):
        io.read_volume(path, None, orientation="IIL")


def test_same_grid_in_two_storage_orders(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 3, (4, 5, 6)).astype(np.uint8)
    affine = kits19_affine(SPACING)
    affine[:3, 3] = (5.0, -3.0, 40.0)
    a = _write(str(tmp_path / "a.nii.gz"), array, affine)
    ornt = nib.orientations.axcodes2ornt("RAS")
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), ornt)
    b = _write(str(tmp_path / "b.nii.gz"),
               nib.orientations.apply_orientation(array, ornt),
               affine @ nib.orientations.inv_ornt_aff(ornt, array.shape))
    va, vb = io.read_labels(a), io.read_labels(b)
    io.check_same_grid(va, vb)
    np.testing.assert_array_equal(va.array, vb.array)


def test_find_cases_sorted_and_filtered(tmp_path):
    for name in ("case_00002", "case_00000", "notes", "case_1"):
        os.makedirs(tmp_path / name)
    assert [os.path.basename(p) for p in io.find_cases(str(tmp_path))] == [
        "case_00000", "case_00002"]
    with pytest.raises(io.CaseError, match="folder not found"):
        io.find_cases(str(tmp_path / "missing"))


# Real KiTS19 label volumes: (slices, slice spacing mm).
REAL = {
    "case_00002": (261, 1.0), "case_00003": (270, 1.0),
    "case_00004": (64, 4.0), "case_00005": (834, 0.5),
    "case_00010": (50, 3.0), "case_00021": (38, 5.0),
    "case_00030": (38, 5.0), "case_00040": (207, 2.0),
}


@pytest.mark.large  # real KiTS19 data
@pytest.mark.parametrize("case_id", sorted(REAL))
def test_real_kits19_labels(kits19_labels_dir, case_id):
    path = os.path.join(kits19_labels_dir, case_id, io.LABELS_FILE)
    if not os.path.exists(path):
        pytest.skip(f"{path} absent")
    volume = io.read_labels(path)
    slices, slice_mm = REAL[case_id]
    assert volume.array.shape == (slices, 512, 512)
    assert volume.orientation == io.FILE_LAYOUT  # KiTS19 is IPL
    assert volume.spacing[0] == pytest.approx(slice_mm)
    assert 0.43 <= volume.spacing[1] == volume.spacing[2] <= 1.05
    counts = np.bincount(volume.array.ravel(), minlength=3)
    assert counts.size == 3 and counts[1] > 0 and counts[2] > 0
    # Axis 0 runs head to feet: the affine maps it to -z (KiTS19 layout).
    assert volume.affine[2, 0] == pytest.approx(-slice_mm)
