"""End to end: ``kits-keras demo`` with a reduced budget (CI-sized).

The full demo (25 cases, 1,500 training steps) is what the README reports;
here 5 cases and 5 steps check that every stage runs for real and
writes what it promises. Dice is not asserted: one epoch cannot learn.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", *args],
        capture_output=True, text=True, env=env, timeout=900)


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
    for key in ("kidney_dice", "tumour_dice", "composite"):
        assert 0.0 <= row[key] <= 1.0
    assert set(result["seconds"]) == {
        "synthesise", "prepare", "train", "infer", "evaluate"}
    volumes = result["volumes_ml"]["case_00004"]
    assert volumes["kidney_ml"] >= 0 and volumes["tumour_ml"] >= 0
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
