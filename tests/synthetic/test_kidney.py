"""KiTS23 cysts in synthetic cases (kits_keras/synthetic/kidney.py
``paint_cysts``, ``make_case(cysts=True)``, ``synth --classes kits23``)."""

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from cli.main import main
from kits_keras import io
from kits_keras.inference.postprocess import postprocess
from kits_keras.synthetic import anatomy
from kits_keras.synthetic import cases as synthetic
from kits_keras.synthetic.kidney import CYST_HU

SEEDS = range(8)


@pytest.fixture(scope="module")
def twins():
    """``(KiTS19 case, KiTS23 case)`` per seed."""
    return [(synthetic.make_case(seed), synthetic.make_case(seed, cysts=True))
            for seed in SEEDS]


def test_kits23_cases_have_all_four_labels(twins):
    values = set()
    with_cysts = 0
    for plain, kits23 in twins:
        labels = kits23.labels.array
        assert labels.dtype == np.uint8 and labels.max() <= 3
        assert plain.labels.array.max() <= 2
        values |= set(np.unique(labels).tolist())
        with_cysts += bool((labels == 3).any())
    assert values == {0, 1, 2, 3}
    # 60 % of cases have cysts: some do, some do not.
    assert 0 < with_cysts < len(SEEDS)


def test_the_kits19_twin_labels_the_same_cysts_kidney(twins):
    cyst_voxels = 0
    for plain, kits23 in twins:
        before, after = plain.labels.array, kits23.labels.array
        cyst = after == 3
        # The same case: same image, the cysts labelled kidney (KiTS19).
        np.testing.assert_array_equal(plain.image.array, kits23.image.array)
        np.testing.assert_array_equal(before, np.where(cyst, 1, after))
        cyst_voxels += cyst.sum()
        # Cysts are water-like in the image of both twins.
        if cyst.any():
            assert np.median(plain.image.array[cyst]) < 40.0
    assert cyst_voxels > 0


def test_kits19_label_volumes_get_cysts_labelled_kidney():
    # A KiTS19 label volume (no label 3) gets painted cysts: labelled
    # kidney, or 3 with KiTS23's classes; tumour is untouched.
    zz, yy, xx = np.ogrid[:30, :80, :80]
    labels = np.zeros((30, 80, 80), np.uint8)
    for centre in (25, 55):
        labels[((zz - 15) / 9.0) ** 2 + ((yy - 40) / 14.0) ** 2
               + ((xx - centre) / 9.0) ** 2 <= 1] = 1
    labels[12:16, 36:42, 52:58] = 2
    with_cysts = 0
    for seed in SEEDS:
        plain, kits23 = (synthetic.make_case(seed, labels=labels,
                                             spacing=(3.0, 1.5, 1.5),
                                             cysts=cysts)
                         for cysts in (False, True))
        cyst = kits23.labels.array == 3
        np.testing.assert_array_equal(plain.image.array, kits23.image.array)
        np.testing.assert_array_equal(plain.labels.array,
                                      np.where(cyst, 1, kits23.labels.array))
        np.testing.assert_array_equal(plain.labels.array == 2, labels == 2)
        if cyst.any():
            with_cysts += 1
            assert np.median(plain.image.array[cyst]) < 40.0  # water
    assert 0 < with_cysts < len(SEEDS)


def test_every_cyst_touches_a_kidney(twins):
    for _, kits23 in twins:
        labels = kits23.labels.array
        cysts, n = ndimage.label(labels == 3, np.ones((3, 3, 3), bool))
        kidney = ndimage.binary_dilation(labels == 1,
                                         np.ones((3, 3, 3), bool))
        for i in range(1, n + 1):
            assert (kidney & (cysts == i)).any()
        # So clean-up keeps them all.
        assert np.array_equal(postprocess(labels), labels)


def test_cyst_intensities_are_water(twins, monkeypatch):
    # Before the scanner's noise and blur: every cyst voxel 0-20 HU.
    monkeypatch.setattr(anatomy, "finish", lambda *args, **kwargs: None)
    painted = 0
    for seed in SEEDS:
        case = synthetic.make_case(seed, cysts=True)
        cyst = case.labels.array == 3
        values = case.image.array[cyst]
        assert ((values >= CYST_HU[0]) & (values <= CYST_HU[1])).all()
        painted += int(cyst.sum())
    assert painted > 0
    monkeypatch.undo()
    # After them, a cyst's interior is still near water (noise 8-35 HU):
    # darker than the kidney in a contrast phase.
    for _, kits23 in twins:
        labels, image = kits23.labels.array, kits23.image.array
        inner = ndimage.binary_erosion(labels == 3)
        if inner.sum() >= 30:
            assert -10.0 < np.median(image[inner]) < 30.0


def test_labels_from_kits23_keeps_cysts_with_cysts_true(tmp_path):
    labels = np.zeros((30, 96, 96), np.uint8)
    zz, yy, xx = np.mgrid[:30, :96, :96]
    labels[((zz - 15) / 9.0) ** 2 + ((yy - 55) / 14.0) ** 2
           + ((xx - 30) / 10.0) ** 2 < 1] = 1
    cyst = ((zz - 15) / 3.0) ** 2 + ((yy - 55) / 5.0) ** 2 + (
        (xx - 22) / 4.0) ** 2 < 1
    labels[cyst] = 3
    case_dir = tmp_path / "labels" / "case_00400"
    case_dir.mkdir(parents=True)
    io.save_nifti(str(case_dir / io.LABELS_FILE), labels,
                  synthetic.kits19_affine((5.0, 3.0, 3.0)))
    out = tmp_path / "out"
    synthetic.write_cases(str(out), labels_from=str(tmp_path / "labels"),
                          seed=0, cysts=True)
    image = io.read_image(str(out / "case_00400" / io.IMAGE_FILE)).array
    written = io.read_labels(str(out / "case_00400" / io.LABELS_FILE),
                             label_values=io.KITS23_LABEL_VALUES).array
    # The label volume is kept as it is: no cyst added, none relabelled.
    assert np.array_equal(written, labels)
    assert -15 < np.median(image[cyst]) < 40


def test_cli_classes_kits23(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["synth", str(out), "--cases", "2", "--seed", "1",
               "--classes", "kits23"])
    assert result.exit_code == 0, result.output
    assert "cyst" in result.output
    labels = io.read_labels(str(out / "case_00000" / io.LABELS_FILE),
                            label_values=io.KITS23_LABEL_VALUES).array
    assert labels.max() == 3  # seed 1 has a cyst
    result = CliRunner().invoke(
        main, ["synth", str(tmp_path / "d"), "--format", "dicom",
               "--classes", "kits23"])
    assert result.exit_code != 0 and "--classes kits23" in result.output
    assert not (tmp_path / "d").exists()


def test_generated_tumours_are_sized_like_real_ones():
    # The 16 real tumour labels: equivalent-sphere radius median 19.6 mm,
    # 3 of 16 under 10 mm. The generator's painted tumours (after its
    # redraws for bone, body and the 40 % kidney cap) should look like
    # that. (The former log-uniform draw passes this on small cases too;
    # it differed on fine grids, see kidney.TUMOUR_RADIUS_MEDIAN_MM.)
    radii = []
    for seed in range(24):
        case = synthetic.make_case(seed)
        tumour_ml = float((case.labels.array == 2).sum()
                          * case.image.voxel_volume_ml)
        radii.append(np.cbrt(3 * tumour_ml * 1000 / (4 * np.pi)))
    assert 13.0 < np.median(radii) < 30.0, radii
    assert np.mean(np.asarray(radii) < 10.0) <= 0.25, radii


def _two_kidneys(tumour=True):
    """Two ellipsoidal kidneys (and a small tumour) on a (30, 80, 80) grid;
    at 3 mm they are kidney-sized and lie in the abdominal cavity."""
    zz, yy, xx = np.ogrid[:30, :80, :80]
    labels = np.zeros((30, 80, 80), np.uint8)
    for centre in (25, 55):
        labels[((zz - 15) / 9.0) ** 2 + ((yy - 40) / 14.0) ** 2
               + ((xx - centre) / 9.0) ** 2 <= 1] = 1
    if tumour:
        labels[12:16, 36:42, 52:58] = 2
    return labels


def test_extra_tumours_are_labelled_and_painted_on_a_kidney():
    labels = _two_kidneys()
    spacing = (3.0, 3.0, 3.0)
    added_ml = []
    for seed in SEEDS:
        plain = synthetic.make_case(seed, labels=labels, spacing=spacing,
                                    cysts=True)
        more = synthetic.make_case(seed, labels=labels, spacing=spacing,
                                   cysts=True, extra_tumours=1)
        before, after = plain.labels.array, more.labels.array
        np.testing.assert_array_equal(labels, _two_kidneys())  # caller's
        # The real tumour stays; nothing foreground is lost.
        assert (after[labels == 2] == 2).all()
        added = (after == 2) & (labels != 2)
        assert added.any(), seed
        # One blob, touching the real kidney.
        pieces, n = ndimage.label(added)
        assert n >= 1
        assert (ndimage.binary_dilation(added) & (labels == 1)).any()
        # Painted like a tumour: darker than the kidney's cortex in
        # contrast phases, not water and not fat.
        image = more.image.array
        assert -50.0 < np.median(image[added]) < 200.0
        added_ml.append(float(added.sum() * more.image.voxel_volume_ml))
        assert before.max() <= 3
    assert len(set(np.round(added_ml, 3))) > 1  # sizes vary


def test_extra_tumours_need_labels(tmp_path):
    with pytest.raises(ValueError, match="extra_tumours"):
        synthetic.make_case(0, extra_tumours=1)
    result = CliRunner().invoke(
        main, ["synth", str(tmp_path / "out"), "--extra-tumours", "1"])
    assert result.exit_code != 0 and "extra_tumours" in result.output
    assert not (tmp_path / "out").exists()
