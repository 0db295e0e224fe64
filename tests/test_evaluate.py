"""KiTS19 evaluation: Dice by hand, folder layouts, missing and bad cases."""

import csv
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from kits_keras import evaluate as ev
from kits_keras import io

# KiTS19 layout: voxel axis 0 runs along world z.
AFFINE = np.array([[0.0, 0.0, -0.8, 0.0], [0.0, -0.8, 0.0, 0.0],
                   [-2.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def truth_and_prediction():
    truth = np.zeros((6, 8, 10), np.uint8)
    truth[1:5, 2:6, 2:7] = 1          # 80 voxels, of which
    truth[2:4, 3:5, 3:5] = 2          # 8 tumour
    pred = np.zeros_like(truth)
    pred[1:5, 2:6, 3:8] = 1           # 80 voxels, 64 overlap with truth > 0
    pred[2:4, 3:5, 4:6] = 2           # 8 tumour, 4 overlap with truth > 1
    return truth, pred


def test_scores_equal_hand_computation():
    truth, pred = truth_and_prediction()
    scores = ev.kits_scores(pred, truth)
    # kidney (label > 0): 2 * 64 / (80 + 80); tumour: 2 * 4 / (8 + 8)
    assert scores["kidney_dice"] == pytest.approx(0.8)
    assert scores["tumour_dice"] == pytest.approx(0.5)
    assert scores["composite"] == pytest.approx(0.65)


def test_empty_conventions():
    empty = np.zeros((3, 3, 3), np.uint8)
    kidney = empty.copy()
    kidney[1, 1, 1] = 1
    assert ev.kits_scores(empty, empty) == {
        "kidney_dice": 1.0, "tumour_dice": 1.0, "composite": 1.0}
    # No tumour anywhere: tumour Dice is 1 by convention.
    assert ev.kits_scores(kidney, kidney)["tumour_dice"] == 1.0
    assert ev.kits_scores(empty, kidney)["kidney_dice"] == 0.0


def test_case_ids():
    assert ev.case_id_of("case_00012") == "case_00012"
    assert ev.case_id_of("/p/prediction_00012.nii.gz") == "case_00012"
    assert ev.case_id_of("case_00012_seg.nii.gz") == "case_00012"
    assert ev.case_id_of("liver.nii.gz") == "liver"


def save(path, array, affine=AFFINE):
    io.save_nifti(path, array, affine)


def make_folders(tmp_path):
    truth, pred = truth_and_prediction()
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    for case in ("case_00001", "case_00002", "case_00003", "case_00004"):
        save(gt_dir / case / "segmentation.nii.gz", truth)
    save(pred_dir / "case_00001.nii.gz", pred)           # nnU-Net layout
    save(pred_dir / "case_00002" / "segmentation.nii.gz", truth)  # perfect
    save(pred_dir / "case_00004.nii.gz", pred[:, :, :9])  # other grid
    return pred_dir, gt_dir


def test_folders_missing_and_mismatch(tmp_path):
    pred_dir, gt_dir = make_folders(tmp_path)
    report = ev.evaluate_folders(str(pred_dir), str(gt_dir))
    rows = {r["case_id"]: r for r in report["cases"]}
    assert rows["case_00001"]["composite"] == pytest.approx(0.65)
    assert rows["case_00002"]["composite"] == 1.0
    assert rows["case_00003"]["status"] == "missing"
    assert rows["case_00004"]["status"] == "error"
    assert "shape" in rows["case_00004"]["error"]
    assert report["missing"] == ["case_00003"]
    assert report["errors"] == ["case_00004"]
    assert report["mean"]["kidney_dice"] == pytest.approx((0.8 + 1) / 4)
    assert report["mean"]["composite"] == pytest.approx((0.65 + 1) / 4)


def test_affine_mismatch_is_an_error(tmp_path):
    truth, _ = truth_and_prediction()
    save(tmp_path / "gt" / "case_00001.nii.gz", truth)
    shifted = AFFINE.copy()
    shifted[1, 3] = 10.0
    save(tmp_path / "pred" / "case_00001.nii.gz", truth, shifted)
    report = ev.evaluate_folders(str(tmp_path / "pred"),
                                 str(tmp_path / "gt"))
    assert report["cases"][0]["status"] == "error"
    assert "affine" in report["cases"][0]["error"]


def test_cli_writes_table_json_csv_and_figures(tmp_path):
    from cli.evaluate import evaluate

    pred_dir, gt_dir = make_folders(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        evaluate, [str(pred_dir), str(gt_dir), "--out", str(out)])
    assert result.exit_code == 1  # case_00004 could not be scored
    assert "case_00001" in result.output and "0.6500" in result.output
    assert "could not be scored: case_00004" in result.output
    report = json.loads((out / "scores.json").read_text())
    assert report["num_cases"] == 4
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "ok", "missing", "error"]
    names = sorted(os.listdir(out))
    assert "dice_boxplot.png" in names
    assert {"overlay_best_case_00002.png", "overlay_worst_case_00001.png",
            "overlay_median_case_00002.png"} <= set(names)
    assert all((out / n).stat().st_size > 1000 for n in names
               if n.endswith(".png"))
