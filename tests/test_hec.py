"""KiTS23 HEC metrics: Dice by hand, Surface Dice against analytic spheres,
real KiTS23 labels (self, shifted, memory)."""

import os
import time
import tracemalloc

import numpy as np
import pytest

from kits_keras import hec
from kits_keras import io

KITS23 = "/work/shared/data/kits23-labels"
ISO = (1.0, 1.0, 1.0)


def labelled_case():
    """Kidney 4x4x4 = 64 voxels with tumour 2x2x2 = 8 and cyst 1x2x2 = 4."""
    truth = np.zeros((6, 6, 8), np.uint8)
    truth[1:5, 1:5, 1:5] = 1
    truth[1:3, 1:3, 1:3] = 2
    truth[4, 3:5, 3:5] = 3
    return truth


def test_hec_dice_by_hand():
    truth = labelled_case()
    pred = np.zeros_like(truth)
    pred[1:5, 1:5, 2:6] = 1          # kidney shifted by 1 in x: 48 shared
    pred[1:3, 1:3, 2:4] = 2          # tumour 8, 4 of them on true tumour
    # The true cyst's 4 voxels are kidney in pred; pred has no cyst.
    scores = hec.kits23_scores(pred, truth, ISO)
    # kidney + masses {1,2,3}: 64 vs 64, overlap 48 -> 96 / 128.
    assert scores["kidney_and_masses_dice"] == pytest.approx(0.75)
    # masses {2,3}: truth 8 + 4 = 12, pred 8, overlap 4 -> 8 / 20.
    assert scores["masses_dice"] == pytest.approx(0.4)
    # tumour {2}: 8 vs 8, overlap 4 -> 8 / 16.
    assert scores["tumour_dice"] == pytest.approx(0.5)
    assert hec.hec_dice(pred, truth, (3,)) == 0.0


def test_kidney_only_case_and_empty_rules():
    kidney = np.zeros((5, 5, 5), np.uint8)
    kidney[1:4, 1:4, 1:4] = 1
    empty = np.zeros_like(kidney)
    # No mass in either: masses and tumour score 1 and 1 (official rule).
    scores = hec.kits23_scores(kidney, kidney, ISO)
    assert scores == {f"{h.name}_{m}": 1.0 for h in hec.HECS
                      for m in ("dice", "surface_dice")}
    # Empty prediction of a kidney: 0 and 0 for kidney, 1 for the rest.
    scores = hec.kits23_scores(empty, kidney, ISO)
    assert scores["kidney_and_masses_dice"] == 0.0
    assert scores["kidney_and_masses_surface_dice"] == 0.0
    assert scores["tumour_dice"] == scores["tumour_surface_dice"] == 1.0
    # Both empty: everything 1.
    assert set(hec.kits23_scores(empty, empty, ISO).values()) == {1.0}
    # A mass predicted where there is none: 0 for masses.
    fake = kidney.copy()
    fake[2, 2, 2] = 3
    scores = hec.kits23_scores(fake, kidney, ISO)
    assert scores["masses_dice"] == scores["masses_surface_dice"] == 0.0
    assert scores["tumour_dice"] == 1.0


def test_hec_table_matches_official_definitions():
    assert [(h.name, h.labels) for h in hec.HECS] == [
        ("kidney_and_masses", (1, 2, 3)), ("masses", (2, 3)),
        ("tumour", (2,))]
    # kits23/configuration/labels.py HEC_SD_TOLERANCES_MM
    assert [round(h.tolerance_mm, 4) for h in hec.HECS] == [
        1.0331, 1.1329, 1.1498]


def test_surface_dice_of_a_shifted_cube_by_hand():
    a = np.zeros((8, 8, 10), bool)
    a[2:6, 2:6, 2:6] = True
    b = np.roll(a, 2, axis=2)  # 2 voxels along x
    # Flat end faces 2 mm apart: within 2 mm everything matches, within
    # 1.5 mm the end faces (and the strips next to them) do not.
    assert hec.surface_dice(a, b, ISO, 2.0) == 1.0
    assert hec.surface_dice(a, b, ISO, 1.5) < 0.9
    assert hec.surface_dice(a, a, ISO, 0.0) == 1.0
    # Symmetric in its arguments.
    assert hec.surface_dice(a, b, ISO, 1.5) == pytest.approx(
        hec.surface_dice(b, a, ISO, 1.5))
    with pytest.raises(ValueError, match="spacing_mm"):
        hec.surface_dice(a, b, (1.0, 1.0), 1.0)


def continuous_shifted_sphere_sd(d, tau):
    """Surface Dice of two spheres of radius R > d, centres d apart.

    A point at angle theta from the shift axis lies at
    |sqrt(R^2 - 2 R d cos(theta) + d^2) - R| from the other sphere; that is
    <= tau for cos(theta) in [(d^2 - 2 R tau - tau^2) / (2 R d),
    (d^2 + 2 R tau - tau^2) / (2 R d)], and area is uniform in cos(theta),
    so the share is tau / d for tau < d (both ends inside [-1, 1]), else 1.
    """
    return min(1.0, tau / d)


def test_closed_form_against_dense_surface_sampling():
    # Independent of the closed form: sample the analytic sphere.
    rng = np.random.default_rng(0)
    points = rng.normal(size=(200_000, 3))
    radius, d = 12.0, 3.0
    points *= radius / np.linalg.norm(points, axis=1, keepdims=True)
    to_other = np.abs(np.linalg.norm(points - [d, 0, 0], axis=1) - radius)
    for tau in (1.0, 1.5, 2.25, 3.5):
        assert np.mean(to_other <= tau) == pytest.approx(
            continuous_shifted_sphere_sd(d, tau), abs=0.005)


def sphere(shape, spacing, centre_mm, radius):
    z, y, x = (np.arange(n) * s for n, s in zip(shape, spacing))
    return ((z[:, None, None] - centre_mm[0]) ** 2
            + (y[None, :, None] - centre_mm[1]) ** 2
            + (x[None, None, :] - centre_mm[2]) ** 2) <= radius ** 2


@pytest.mark.parametrize("spacing", [(0.5, 0.5, 0.5), (1.0, 0.5, 0.4),
                                     (2.0, 0.8, 0.8)])
def test_shifted_sphere_against_continuous_answer(spacing):
    radius, d = 12.0, 3.0
    extent = 2 * radius + d + 6
    shape = tuple(int(np.ceil(extent / s)) for s in spacing)
    centre = np.full(3, extent / 2)
    a = sphere(shape, spacing, centre - [0, 0, d / 2], radius)
    b = sphere(shape, spacing, centre + [0, 0, d / 2], radius)
    assert hec.surface_dice(a, b, spacing, d + 0.5) == 1.0
    # The surface band straddles the boundary by up to half a voxel
    # diagonal h, so distances come out up to ~h short (the official
    # surface-distance shares this): the result lies between the
    # continuous answers at tau and tau + h, give or take 0.02 for the
    # area weights.
    h = 0.5 * float(np.linalg.norm(spacing))
    for tau in (1.0, 1.5, 2.25):
        value = hec.surface_dice(a, b, spacing, tau)
        low = continuous_shifted_sphere_sd(d, tau) - 0.02
        high = continuous_shifted_sphere_sd(d, tau + h) + 0.02
        assert low <= value <= high, (tau, value, low, high)


def kits23_cases():
    if not os.path.isdir(KITS23):
        return []
    return sorted(n for n in os.listdir(KITS23) if n.startswith("case_"))


def read_case(name):
    return io.read_labels(os.path.join(KITS23, name, io.LABELS_FILE),
                          label_values=hec.KITS23_LABEL_VALUES)


def check_real_case(name):
    truth = read_case(name)
    own = hec.kits23_scores(truth.array, truth.array, truth.spacing)
    assert set(own.values()) == {1.0}
    # One voxel along x (0.7-1 mm, within every HEC's tolerance).
    shifted = np.roll(truth.array, 1, axis=2)
    scores = hec.kits23_scores(shifted, truth.array, truth.spacing)
    for h in hec.HECS:
        assert 0.5 < scores[f"{h.name}_dice"] < 1.0, (h.name, scores)
        assert scores[f"{h.name}_surface_dice"] > 0.95, (h.name, scores)


# The first real case in the fast suite; the others, 5-15 s each, large.
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=[pytest.mark.large] if i else [])
    for i, n in enumerate(n for n in kits23_cases() if n != "case_00442")])
def test_real_kits23_self_and_shifted(name):
    check_real_case(name)


@pytest.mark.large  # real KiTS23 data, the 975-slice case (~6-8 s)
@pytest.mark.skipif("case_00442" not in kits23_cases(),
                    reason="KiTS23 labels not available")
def test_real_975_slice_case_memory_is_bounded():
    truth = read_case("case_00442")
    assert truth.array.shape[0] == 975
    shifted = np.roll(truth.array, 1, axis=0)
    tracemalloc.start()
    start = time.perf_counter()
    scores = hec.kits23_scores(shifted, truth.array, truth.spacing)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # The two label volumes themselves are 2 x 255 MB, not counted here.
    assert peak < 2e9, peak
    assert 0.5 < scores["kidney_and_masses_dice"] < 1.0
    print(f"case_00442: {seconds:.1f} s, peak {peak / 1e6:.0f} MB, {scores}")


def hand_case_prediction():
    """The prediction of :func:`test_hec_dice_by_hand` (0.75, 0.4, 0.5)."""
    pred = np.zeros((6, 6, 8), np.uint8)
    pred[1:5, 1:5, 2:6] = 1
    pred[1:3, 1:3, 2:4] = 2
    return pred


def test_cli_kits23_on_constructed_cases(tmp_path):
    import csv
    import json

    from click.testing import CliRunner

    from cli.evaluate import evaluate

    # KiTS layout: voxel axis 0 runs along world z, 2.5 mm slices.
    affine = np.array([[0.0, 0.0, -0.8, 0.0], [0.0, -0.8, 0.0, 0.0],
                       [-2.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    truth = labelled_case()
    gt_dir, pred_dir, out = tmp_path / "gt", tmp_path / "pred", tmp_path / "o"
    for case in ("case_00001", "case_00002", "case_00003"):
        io.save_nifti(gt_dir / f"{case}.nii.gz", truth, affine)
    io.save_nifti(pred_dir / "case_00001.nii.gz", hand_case_prediction(),
                  affine)
    io.save_nifti(pred_dir / "case_00002.nii.gz", truth, affine)
    io.save_nifti(pred_dir / "case_00003.nii.gz", np.zeros_like(truth),
                  affine)
    result = CliRunner().invoke(evaluate, [
        str(pred_dir), str(gt_dir), "--out", str(out), "--metric", "kits23"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "scores.json").read_text())
    assert report["metric"] == "kits23"
    rows = {r["case_id"]: r for r in report["cases"]}
    first = rows["case_00001"]
    assert (first["kidney_and_masses_dice"], first["masses_dice"],
            first["tumour_dice"]) == pytest.approx((0.75, 0.4, 0.5))
    assert first["mean_dice"] == pytest.approx(0.55)
    spacing = io.read_volume(str(gt_dir / "case_00001.nii.gz")).spacing
    assert spacing == pytest.approx((2.5, 0.8, 0.8))
    # Kidney+masses and tumour are shifted 0.8 mm along x, within their
    # tolerances (1.03, 1.15 mm): Surface Dice 1. The predicted masses miss
    # the cyst, whose surface lies farther: below 1.
    assert first["kidney_and_masses_surface_dice"] == 1.0
    assert first["tumour_surface_dice"] == 1.0
    expected = hec.surface_dice(hand_case_prediction() >= 2, truth >= 2,
                                spacing, hec.HECS[1].tolerance_mm)
    assert 0.0 < expected < 1.0
    assert first["masses_surface_dice"] == pytest.approx(expected)
    assert set(v for k, v in rows["case_00002"].items()
               if k.endswith("dice")) == {1.0}
    assert set(v for k, v in rows["case_00003"].items()
               if k.endswith("dice")) == {0.0}
    assert report["mean"]["tumour_dice"] == pytest.approx(0.5)
    assert report["conventions"]["hecs"]["masses"] == [2, 3]
    with open(out / "scores.csv") as f:
        header = next(csv.reader(f))
    assert header[:2] == ["case_id", "kidney_and_masses_dice"]
    assert "tumour_surface_dice" in header and header[-1] == "error"
    assert "case_00001" in result.output and "0.7500" in result.output
    assert "SD tumour" in result.output
    names = set(os.listdir(out))
    assert {"dice_boxplot.png", "overlay_best_case_00002.png",
            "overlay_worst_case_00003.png"} <= names
    # The same case under --metric kits19 refuses the cyst label.
    result = CliRunner().invoke(evaluate, [
        str(pred_dir), str(gt_dir), "--out", str(tmp_path / "k19")])
    assert result.exit_code == 1
    assert "3 case(s) could not be scored" in result.output
    report = json.loads((tmp_path / "k19" / "scores.json").read_text())
    assert "outside {0, 1, 2}" in report["cases"][0]["error"]
