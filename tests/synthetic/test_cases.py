"""Tests for kits_keras/synthetic/cases.py and ``kits-keras synth``."""

import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from cli.main import main
from kits_keras import io
from kits_keras.synthetic import cases as synthetic


@pytest.fixture(scope="module")
def cli_cases(tmp_path_factory):
    """``kits-keras synth OUT --cases 3 --seed 0 --preview``."""
    out = tmp_path_factory.mktemp("synth") / "synth-out"
    result = CliRunner().invoke(
        main, ["synth", str(out), "--cases", "3", "--seed", "0", "--preview"])
    assert result.exit_code == 0, result.output
    return str(out), result.output


def _arrays(case_dir):
    return tuple(np.asarray(nib.load(os.path.join(case_dir, f)).dataobj)
                 for f in (io.IMAGE_FILE, io.LABELS_FILE))


def test_cli_writes_cases_nibabel_opens(cli_cases):
    out, output = cli_cases
    assert sorted(os.listdir(out)) == [
        "case_00000", "case_00001", "case_00002"]
    assert output.count("\n") == 4  # one line per case, then a summary
    for name in os.listdir(out):
        image, labels = _arrays(os.path.join(out, name))
        assert image.shape == labels.shape and image.ndim == 3
        assert image.dtype == np.int16 and labels.dtype == np.uint8
        assert set(np.unique(labels).tolist()) == {0, 1, 2}


def test_small_geometry_is_kits19_like(cli_cases):
    out, _ = cli_cases
    for name in sorted(os.listdir(out)):
        case = io.load_case(os.path.join(out, name))
        nz, ny, nx = case.image.array.shape
        sz, sy, sx = case.spacing
        assert 24 <= nz <= 64 and 76 <= ny <= 160 and 96 <= nx <= 160
        assert 3.0 <= sz <= 5.0 and 2.2 <= sy == sx <= 3.2
        assert case.image.orientation == io.FILE_LAYOUT
        # KiTS19 affine: voxel axis 0 -> -z, 1 -> -y, 2 -> -x.
        np.testing.assert_allclose(case.image.affine,
                                   synthetic.kits19_affine(case.spacing))
        # Field of view of a real abdomen (mm).
        assert 280 <= nx * sx <= 520 and 120 <= nz * sz <= 320


def test_same_seed_byte_identical_different_seed_differs(
        cli_cases, synthetic_cases_dir):
    out, _ = cli_cases
    for name in ("case_00000", "case_00002"):
        a = _arrays(os.path.join(out, name))
        b = _arrays(os.path.join(synthetic_cases_dir, name))
        for x, y in zip(a, b):
            assert x.tobytes() == y.tobytes()
    c1 = synthetic.make_case(5)
    c2 = synthetic.make_case(5)
    c3 = synthetic.make_case(6)
    assert c1.image.array.tobytes() == c2.image.array.tobytes()
    assert c1.labels.array.tobytes() == c2.labels.array.tobytes()
    assert (c1.image.array.shape != c3.image.array.shape
            or not np.array_equal(c1.image.array, c3.image.array))


def test_preview_png_written(cli_cases):
    from matplotlib import image as mpimg

    out, _ = cli_cases
    png = os.path.join(out, "case_00000", "preview.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    pixels = mpimg.imread(png)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 600
    assert pixels[..., :3].std() > 0.1  # an image, not a blank canvas


def _tissue_stats(case):
    image, labels = case.image.array, case.labels.array
    body = image > -500
    kidney = image[labels == 1]
    tumour = image[labels == 2]
    other = image[body & (labels == 0)]
    return image, body, kidney, tumour, other


@pytest.fixture(scope="module")
def small_cases():
    """Portal-venous cases (the phase the intensity ranges below are for)."""
    return [synthetic.make_case(seed, phase="portal-venous")
            for seed in range(10)]


def test_ct_intensities_look_like_contrast_ct(small_cases):
    overlap = {"kidney": [], "tumour": []}
    for case in small_cases:
        image, body, kidney, tumour, other = _tissue_stats(case)
        labels = case.labels.array
        assert (labels == 1).any() and (labels == 2).any()
        assert image.dtype == np.float32 and np.all(image == np.rint(image))
        assert -1024 <= image.min() and image.max() <= 3071
        assert np.mean(image < -900) > 0.1  # air around the body
        assert 0.2 < body.mean() < 0.9  # slim to large patients
        assert np.mean(other < -50) > 0.15  # fat
        assert np.sum(image > 400) > 50  # bone
        assert 100 < np.median(kidney) < 230  # enhanced parenchyma
        assert 10 < np.median(tumour) < 140  # necrotic cores are ~10-30
        assert np.median(tumour) < np.median(kidney)
        # Noise (SD 8-35 HU): flat air in the corner still fluctuates.
        assert 3 < image[:, :3, :3].std() < 40
        for name, voxels in (("kidney", kidney), ("tumour", tumour)):
            lo, hi = np.percentile(voxels, (10, 90))
            overlap[name].append(
                np.sum((other > lo) & (other < hi)) / voxels.size)
    # Not separable by HU alone: other tissue (liver, spleen, vessels,
    # bowel, marrow) falls in the labels' intensity ranges. The enhancing
    # cortex is brighter than most organs on real scans too, so the kidney
    # overlaps less than the tumour.
    assert np.median(overlap["tumour"]) > 3.0
    assert np.median(overlap["kidney"]) > 0.5


def test_cases_vary(small_cases):
    from scipy import ndimage

    shapes, kidneys, tumour_ml = set(), set(), []
    for case in small_cases:
        shapes.add(case.image.array.shape)
        labels = case.labels.array
        kidneys.add(min(ndimage.label(labels > 0)[1], 2))
        tumour_ml.append((labels == 2).sum() * case.image.voxel_volume_ml)
    assert len(shapes) == len(small_cases)
    assert min(tumour_ml) < 20.0 and max(tumour_ml) > 100.0


def test_full_geometry_ranges():
    geometries = [synthetic.sample_geometry(np.random.default_rng(s), "full")
                  for s in range(60)]
    slice_mm = [sp[0] for _, sp in geometries]
    assert min(slice_mm) == 0.5 and max(slice_mm) == 5.0
    for shape, spacing in geometries:
        assert 29 <= shape[0] <= synthetic.MAX_FULL_SLICES
        assert shape[1] == 512 and shape[2] in (512, 796)
        assert 0.5 <= spacing[1] == spacing[2] <= 1.0
    assert any(s[2] == 796 for s, _ in geometries)
    with pytest.raises(ValueError, match="size"):
        synthetic.sample_geometry(np.random.default_rng(0), "huge")


@pytest.mark.large  # a 19-million-voxel volume; geometry is covered above
def test_full_case_real_size():
    case = synthetic.make_case(26, "full")
    nz, ny, nx = case.image.array.shape
    sz, sy, sx = case.spacing
    assert case.labels.array.shape == (nz, ny, nx)
    # KiTS19's full-size scans: 512 rows, 512 or 796 columns, an abdomen
    # of 300-500 mm across and 150-320 mm (at least 29 slices) long.
    assert ny == 512 and nx in (512, 796)
    assert 0.5 <= sy == sx <= 1.0 and 300 <= nx * sx <= 500
    assert 145 <= nz * sz <= 320 + sz
    np.testing.assert_allclose(case.image.affine,
                               synthetic.kits19_affine(case.spacing))
    assert set(np.unique(case.labels.array).tolist()) == {0, 1, 2}
    kidney = case.image.array[case.labels.array == 1]
    assert 100 < np.median(kidney) < 230


@pytest.mark.large  # real KiTS19 data
def test_labels_from_real_volume(tmp_path, kits19_labels_dir):
    src = tmp_path / "labels"
    os.makedirs(src / "case_00021")
    shutil.copy(os.path.join(kits19_labels_dir, "case_00021", io.LABELS_FILE),
                src / "case_00021" / io.LABELS_FILE)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["synth", str(out), "--labels-from", str(src), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert os.listdir(out) == ["case_00021"]
    case = io.load_case(str(out / "case_00021"))
    real = io.read_labels(str(src / "case_00021" / io.LABELS_FILE))
    # The real labels, plus what painted cysts that bulge out of a kidney
    # add to it (kidney, as KiTS19 annotated them): nothing removed, the
    # tumour untouched, every added voxel next to the kidney.
    labels, given = case.labels.array, real.array
    added = labels != given
    assert np.all(labels[added] == 1) and np.all(given[added] == 0)
    np.testing.assert_array_equal(labels == 2, given == 2)
    assert not (added & ~ndimage.binary_dilation(
        given == 1, np.ones((3, 3, 3), bool), iterations=30)).any()
    np.testing.assert_allclose(case.image.affine, real.affine)
    assert case.image.array.shape == (38, 512, 512)
    image, _, kidney, tumour, _ = _tissue_stats(case)
    assert 100 < np.median(kidney) < 230
    assert 20 < np.median(tumour) < 140
    assert np.mean(image < -900) > 0.1


def test_labels_from_array_needs_spacing():
    labels = np.zeros((8, 40, 40), np.uint8)
    labels[3:5, 10:20, 10:20] = 1
    labels[4, 12:14, 12:14] = 2
    with pytest.raises(ValueError, match="spacing"):
        synthetic.make_case(0, labels=labels)
    case = synthetic.make_case(0, labels=labels, spacing=(5.0, 4.0, 4.0))
    np.testing.assert_array_equal(case.labels.array, labels)
    assert case.image.array.shape == labels.shape


def test_existing_case_needs_overwrite(tmp_path):
    out = str(tmp_path)
    synthetic.write_cases(out, 1, seed=0)
    before = _arrays(os.path.join(out, "case_00000"))
    result = CliRunner().invoke(main, ["synth", out, "--cases", "1",
                                       "--seed", "1"])
    assert result.exit_code == 1
    assert "already exists" in result.output
    after = _arrays(os.path.join(out, "case_00000"))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(before, after))
    result = CliRunner().invoke(main, ["synth", out, "--cases", "1",
                                       "--seed", "1", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert _arrays(os.path.join(out, "case_00000"))[0].tobytes() != before[
        0].tobytes()
    assert sorted(os.listdir(out)) == ["case_00000"]  # no staging left


def test_write_cases_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="size"):
        synthetic.write_cases(str(tmp_path), 1, size="medium")
    with pytest.raises(ValueError, match="num_cases"):
        synthetic.write_cases(str(tmp_path), 0)


def test_contrast_phases_change_kidney_and_organs():
    medians = {}
    for phase in ("non-contrast", "arterial", "portal-venous",
                  "nephrographic"):
        kidney, tumour = [], []
        for seed in range(3):
            case = synthetic.make_case(seed, phase=phase)
            image, labels = case.image.array, case.labels.array
            kidney.append(np.median(image[labels == 1]))
            tumour.append(np.median(image[labels == 2]))
        medians[phase] = (np.median(kidney), np.median(tumour))
    # Without contrast the kidney is soft-tissue grey, like liver and muscle.
    assert medians["non-contrast"][0] < 60
    assert medians["non-contrast"][1] < 60
    for phase in ("arterial", "portal-venous", "nephrographic"):
        assert medians[phase][0] > 100, (phase, medians)
    from kits_keras.synthetic import anatomy

    drawn = {anatomy.sample_tissue(np.random.default_rng(seed))["phase"]
             for seed in range(40)}
    assert drawn == set(anatomy.PHASES)


def test_labels_from_kits23_paints_cysts_as_water_labelled_kidney(tmp_path):
    labels = np.zeros((30, 96, 96), np.uint8)
    zz, yy, xx = np.mgrid[:30, :96, :96]
    kidney = ((zz - 15) / 9.0) ** 2 + ((yy - 55) / 14.0) ** 2 + (
        (xx - 30) / 10.0) ** 2 < 1
    cyst = ((zz - 15) / 3.0) ** 2 + ((yy - 55) / 5.0) ** 2 + (
        (xx - 22) / 4.0) ** 2 < 1
    labels[kidney] = 1
    labels[cyst] = 3
    case_dir = tmp_path / "labels" / "case_00400"
    case_dir.mkdir(parents=True)
    spacing = (5.0, 3.0, 3.0)
    io.save_nifti(str(case_dir / io.LABELS_FILE), labels,
                  synthetic.kits19_affine(spacing))
    out = tmp_path / "out"
    synthetic.write_cases(str(out), labels_from=str(tmp_path / "labels"),
                          seed=0)
    case = io.load_case(str(out / "case_00400"))
    written = case.labels.array
    assert written.max() == 1 and (written[cyst] == 1).all()
    water = np.median(case.image.array[cyst])
    parenchyma = np.median(case.image.array[labels == 1])
    assert -15 < water < 40
    assert water < parenchyma or parenchyma < 60  # non-contrast case


def test_label_volume_values_checked(tmp_path):
    path = str(tmp_path / "bad.nii.gz")
    io.save_nifti(path, np.full((4, 4, 4), 4, np.uint8), np.eye(4))
    with pytest.raises(io.CaseError, match="bad.nii.gz"):
        synthetic.read_label_volume(path)


def test_bad_label_volume_leaves_nothing(tmp_path):
    # One good label volume, then a broken one: no case is written, and
    # the output folder the run created is gone again.
    labels = tmp_path / "labels"
    good = labels / "case_00000"
    good.mkdir(parents=True)
    volume = np.zeros((8, 16, 16), np.uint8)
    volume[2:6, 4:12, 4:12] = 1
    io.save_nifti(str(good / io.LABELS_FILE), volume, np.eye(4))
    (labels / "case_00001").mkdir()
    (labels / "case_00001" / io.LABELS_FILE).write_bytes(b"")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["synth", str(out), "--labels-from",
                                       str(labels)])
    assert result.exit_code == 1
    assert "case_00001" in result.output and "NIfTI" in result.output
    assert not out.exists()
    # An existing folder is kept, untouched.
    out.mkdir()
    (out / "mine.txt").write_text("x")
    result = CliRunner().invoke(main, ["synth", str(out), "--labels-from",
                                       str(labels)])
    assert result.exit_code == 1
    assert sorted(os.listdir(out)) == ["mine.txt"]
