"""End to end: ``kits-keras demo`` with a reduced budget (CI-sized).

The full demo (25 cases, 1,500 training steps) is what the README reports;
here 5 cases and 5 steps check that every stage runs for real and
writes what it promises. Dice is not asserted: one epoch cannot learn.
"""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

# The demo is a minute or more of subprocess work on 2 cores; the fast
# suite goes through prepare, fit and infer's CLI in test_prepare_cli.
pytestmark = pytest.mark.large

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", *args],
        capture_output=True, text=True, env=env, timeout=900)


def _dice(a, b):
    """Dice of two boolean masks; 1.0 when both are empty (KiTS19)."""
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(a & b) / total


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "out")
    proc = _run("demo", "--out", out, "--steps", "5", "--cases", "5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_writes_every_output(demo_dir):
    out, stdout = demo_dir
    with open(os.path.join(out, "demo.json")) as f:
        result = json.load(f)
    assert result["cases"]["test"] == ["case_00004"]
    assert len(result["cases"]["train"]) == 4
    row = result["scores"]["cases"][0]
    assert row["status"] == "ok"
    # The reported Dice and volumes are those of the files it wrote,
    # recomputed here with nibabel and numpy only.
    pred_img = nib.load(os.path.join(out, "predictions",
                                     "case_00004.nii.gz"))
    pred = np.asarray(pred_img.dataobj)
    truth = np.asarray(nib.load(os.path.join(
        out, "cases", "case_00004", "segmentation.nii.gz")).dataobj)
    assert pred.shape == truth.shape
    expected = {"kidney_dice": _dice(pred > 0, truth > 0),
                "tumour_dice": _dice(pred > 1, truth > 1)}
    expected["composite"] = (expected["kidney_dice"]
                             + expected["tumour_dice"]) / 2
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, abs=1e-6), key
    assert set(result["seconds"]) == {
        "synthesise", "prepare", "train", "infer", "evaluate"}
    voxel_ml = float(np.prod(pred_img.header.get_zooms()[:3])) / 1000.0
    volumes = result["volumes_ml"]["case_00004"]
    for key, label in (("kidney_ml", 1), ("tumour_ml", 2)):
        assert volumes[key] == pytest.approx(
            np.count_nonzero(pred == label) * voxel_ml, rel=1e-6), key
    for path in ("run/model.keras", "run/history.csv", "run/loss_curves.png",
                 "evaluation/dice_boxplot.png", "evaluation/scores.csv",
                 "predictions/case_00004.nii.gz", "predictions/summary.json"):
        full = os.path.join(out, path)
        assert os.path.getsize(full) > 0, full
    overlays = [n for n in os.listdir(os.path.join(out, "evaluation"))
                if n.endswith(".png") and "overlay" in n]
    assert overlays
    assert "case_00004" in stdout and "mean" in stdout


def test_demo_refuses_to_replace_without_overwrite(demo_dir):
    out, _ = demo_dir
    before = os.path.getmtime(os.path.join(out, "demo.json"))
    proc = _run("demo", "--out", out, "--steps", "5", "--cases", "5")
    assert proc.returncode == 1
    assert "--overwrite" in proc.stderr
    assert os.path.getmtime(os.path.join(out, "demo.json")) == before


def test_kits23_demo_reports_hec_dice_of_the_files_it_wrote(tmp_path):
    """``demo --dataset kits23``: cysts in the cases, a 0-3 label map, and
    KiTS23's HEC Dice recomputed here from the written files."""
    out = str(tmp_path / "out")
    proc = _run("demo", "--out", out, "--steps", "5", "--cases", "5",
                "--dataset", "kits23")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "demo.json")) as f:
        result = json.load(f)
    assert result["dataset"] == "kits23" and result["config"] == (
        "kits23_tiny")
    row = result["scores"]["cases"][0]
    assert row["status"] == "ok"
    pred = np.asarray(nib.load(os.path.join(
        out, "predictions", "case_00004.nii.gz")).dataobj)
    truth = np.asarray(nib.load(os.path.join(
        out, "cases", "case_00004", "segmentation.nii.gz")).dataobj)
    # Cysts are painted into the synthetic cases (not into every one).
    assert any(np.any(np.asarray(nib.load(os.path.join(
        out, "cases", c, "segmentation.nii.gz")).dataobj) == 3)
        for c in result["cases"]["train"] + result["cases"]["test"])
    assert set(np.unique(pred)) <= {0, 1, 2, 3}
    for name, labels in (("kidney_and_masses", (1, 2, 3)),
                         ("masses", (2, 3)), ("tumour", (2,))):
        expected = _dice(np.isin(pred, labels), np.isin(truth, labels))
        assert row[f"{name}_dice"] == pytest.approx(expected, abs=1e-6)
        assert 0 <= row[f"{name}_surface_dice"] <= 1
    assert "masses" in proc.stdout
