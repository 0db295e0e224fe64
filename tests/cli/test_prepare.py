"""``kits-keras prepare`` as a user runs it: dataset sizes from 1 case up,
reruns on changed folders, killed builds, folders with no usable case.

Each check runs the real command (``tests/cli_harness.py``) except where
many quick reruns are checked in one process (``CliRunner``).
"""

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from tests.cli_harness import REPO
from tests.cli_harness import run_cli
from tests.cli_harness import snapshot
from kits_keras import io

CONFIG = "tiny"  # dataset demo_4.0x3.2mm
DATASET = "demo_4.0x3.2mm"


@pytest.fixture
def five_cases(five_cases_dir):
    """5 small synthetic cases (seed 0, shared with other files); copy
    before changing anything."""
    return five_cases_dir


def cases_folder(five_cases, folder, ids):
    """A folder holding copies (times kept) of the cases ``ids`` (0..4)."""
    os.makedirs(folder, exist_ok=True)
    for i in ids:
        shutil.copytree(os.path.join(five_cases, f"case_{i:05d}"),
                        os.path.join(folder, f"case_{i:05d}"),
                        copy_function=shutil.copy2)
    return str(folder)


def prepare_args(manual_dir, data_dir, *extra):
    return ["prepare", "--manual-dir", manual_dir, "--data-dir", data_dir,
            "--config", CONFIG, "--workers", "1", *extra]


def error_line(result):
    """The single ``Error:`` line a refused command must print."""
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.error_lines
              if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return errors[0]


def corrupt(path):
    with open(path, "r+b") as fh:  # truncate the gzip stream
        fh.truncate(200)


# prepare, fit and infer through the real CLI, ~90 s at 5 cases on 2
# cores: large, as is every training run (tests/training). The fast suite
# prepares and segments in process (tests/data, tests/inference) and
# checks the training callbacks and the CLI's refusals.
@pytest.mark.large
@pytest.mark.parametrize("num_cases", [1, 2, 3, 4, 5])
def test_any_number_of_cases_builds_and_fits(five_cases, tmp_path,
                                             num_cases):
    cases = cases_folder(five_cases, tmp_path / "cases", range(num_cases))
    data_dir = str(tmp_path / "tfds")
    result = run_cli(prepare_args(cases, data_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    n_train = num_cases - (num_cases == 5)
    splits = f"(test 1, train {n_train})" if num_cases == 5 else (
        f"(train {n_train})")
    assert f"built {splits}" in result.stdout
    assert ("no test split" in result.stderr) == (num_cases < 5)

    run = str(tmp_path / "run")
    # 16 x 32 x 32 patches: the smallest tiny allows, to keep it fast.
    result = run_cli(["fit", "--data-dir", data_dir, "--config", CONFIG,
                      "--epochs", "1", "--steps-per-epoch", "1",
                      "--patch-size", "16", "32", "32", "--out", run])
    assert result.returncode == 0, result.stderr[-3000:]
    # tiny holds out 1 validation case: impossible with 1 training case.
    assert ("training without validation" in result.stderr) == (
        n_train == 1)
    assert os.path.isfile(os.path.join(run, "model.keras"))
    assert os.path.isfile(os.path.join(run, "checkpoints", "state.json"))
    if num_cases < 5:
        return
    # The trained run segments the held-out case on the CT's own grid.
    case = os.path.join(cases, "case_00004")
    out = str(tmp_path / "predictions")
    result = run_cli(["infer", case, "--model", run, "-o", out, "--tta",
                      "none"])
    assert result.returncode == 0, result.stderr[-3000:]
    seg = io.read_labels(os.path.join(out, "case_00004.nii.gz"))
    ct = io.read_image(os.path.join(case, io.IMAGE_FILE))
    assert seg.array.shape == ct.array.shape
    np.testing.assert_allclose(seg.affine, ct.affine)
    assert set(np.unique(seg.array).tolist()) <= {0, 1, 2}


@pytest.mark.large  # six prepares of the 5 cases
def test_rerun_on_changed_folder(five_cases, tmp_path):
    """Same files: reused. Added, removed, re-annotated cases, another
    folder: one line naming --rebuild, the dataset untouched. --rebuild:
    rebuilt from the new files."""
    from cli.main import main

    def prepare(manual_dir, *extra):
        return CliRunner().invoke(
            main, prepare_args(manual_dir, data_dir, *extra),
            catch_exceptions=False)

    cases = cases_folder(five_cases, tmp_path / "cases", [0, 1])
    data_dir = str(tmp_path / "tfds")
    assert prepare(cases).exit_code == 0
    before = snapshot(data_dir)

    result = prepare(cases)
    assert result.exit_code == 0 and "already prepared" in result.output
    # Same files copied elsewhere with their times: the same data.
    copy = str(tmp_path / "copy")
    shutil.copytree(cases, copy, copy_function=shutil.copy2)
    assert "already prepared" in prepare(copy).output

    added = cases_folder(five_cases, tmp_path / "added", [0, 1, 2])
    removed = cases_folder(five_cases, tmp_path / "removed", [0])
    other = cases_folder(five_cases, tmp_path / "other", [3, 4])
    relabelled = str(tmp_path / "relabelled")
    shutil.copytree(cases, relabelled, copy_function=shutil.copy2)
    labels = io.read_labels(os.path.join(relabelled, "case_00001",
                                         io.LABELS_FILE))
    array = labels.array.copy()
    array[array == 2] = 1  # the tumour re-annotated as kidney
    io.save_like(os.path.join(relabelled, "case_00001", io.LABELS_FILE),
                 array, labels)
    for folder, says in ((added, "1 case(s) added: case_00002"),
                         (removed, "1 case(s) removed: case_00001"),
                         (relabelled, "1 case(s) changed: case_00001"),
                         (other, "2 case(s) added: case_00003, case_00004")):
        result = prepare(folder)
        assert result.exit_code == 1, result.output
        lines = [line for line in result.output.splitlines()
                 if line.startswith("Error:")]
        assert len(lines) == 1, result.output
        assert says in lines[0] and "--rebuild" in lines[0]
        assert snapshot(data_dir) == before

    # The real command: exit 1, one line on stderr, nothing changed.
    result = run_cli(prepare_args(added, data_dir))
    assert "--rebuild" in error_line(result)
    assert snapshot(data_dir) == before

    result = prepare(added, "--rebuild")
    assert result.exit_code == 0, result.output
    assert "built (train 3)" in result.output
    import tensorflow_datasets as tfds

    import tfds_kits19  # noqa: F401

    builder = tfds.builder(f"kits19/{DATASET}", data_dir=data_dir)
    assert builder.info.metadata["train_case_ids"] == [
        "case_00000", "case_00001", "case_00002"]
    root = os.path.join(data_dir, "kits19", DATASET)
    assert sorted(os.listdir(root)) == [".prepare.lock", "1.0.0"]
    assert "already prepared" in prepare(added).output


def test_preprocessing_code_change_needs_rebuild(five_cases, tmp_path,
                                                 monkeypatch):
    from kits_keras.data import prepare as dataset
    from tfds_kits19 import fingerprint

    cases = cases_folder(five_cases, tmp_path / "cases", [0])
    data_dir = str(tmp_path / "tfds")
    dataset.prepare(cases, data_dir, CONFIG, workers=1)
    monkeypatch.setattr(fingerprint, "code_version",
                        lambda *_: "0123456789abcdef")
    with pytest.raises(ValueError, match=r"out of date .*\(preprocessing code "
                                         r"changed\); pass --rebuild"):
        dataset.prepare(cases, data_dir, CONFIG, workers=1)
    result = dataset.prepare(cases, data_dir, CONFIG, workers=1,
                             rebuild=True)
    assert result.built


def test_foreground_samples_are_part_of_the_dataset(five_cases, tmp_path):
    """``data.foreground_samples`` caps the coordinates stored per class;
    a dataset built with another value is out of date for ``prepare`` and
    refused by training's reader."""
    from kits_keras import config as config_lib
    from kits_keras.data import prepared
    from kits_keras.data import prepare as dataset

    cases = cases_folder(five_cases, tmp_path / "cases", [0])
    data_dir = str(tmp_path / "tfds")
    tiny = config_lib.get_config(CONFIG)
    few = config_lib.override(tiny, data={"foreground_samples": 50})
    dataset.prepare(cases, data_dir, few.data, workers=1)
    (case,) = prepared.load_volumes(few, data_dir, "train")
    assert (case["labels"] > 0).sum() > 50
    assert case["foreground_coords"].shape == (50, 3)
    with pytest.raises(ValueError, match="built with foreground_samples=50, "
                                         "the config has 10000"):
        list(prepared.load_volumes(tiny, data_dir, "train"))
    with pytest.raises(ValueError, match=r"out of date .*\(foreground_"
                                         r"samples 50 -> 10000\)"):
        dataset.prepare(cases, data_dir, CONFIG, workers=1)


# Runs prepare in a process that SIGKILLs itself on the 2nd case it
# preprocesses: what `kill -9` or the OOM killer leaves behind.
_KILLED_PREPARE = """
import os, signal, sys
from kits_keras.backend import import_tensorflow
import_tensorflow()
from kits_keras.data import prepare as dataset
from tfds_kits19.kits19 import kits19_dataset_builder as kb
real, calls = kb.process_case, []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
kb.process_case = dying
dataset.prepare(sys.argv[1], sys.argv[2], "tiny", workers=1,
                rebuild=sys.argv[3] == "rebuild")
"""


def killed_prepare(manual_dir, data_dir, rebuild=False):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_PREPARE, manual_dir, data_dir,
         "rebuild" if rebuild else "-"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@pytest.mark.large  # 2 processes; test_prepare covers an interrupted build
def test_killed_build_is_cleaned_up_by_the_next(five_cases, tmp_path):
    from kits_keras.data import prepare as dataset

    cases = cases_folder(five_cases, tmp_path / "cases", [0, 1])
    data_dir = str(tmp_path / "tfds")
    root = os.path.join(data_dir, "kits19", DATASET)
    killed_prepare(cases, data_dir)
    left = [n for n in os.listdir(root) if n.startswith("incomplete.")]
    assert left and "1.0.0" not in os.listdir(root)

    result = dataset.prepare(cases, data_dir, CONFIG, workers=1)
    assert result.built and result.num_examples == {"train": 2}
    assert sorted(os.listdir(root)) == [".prepare.lock", "1.0.0"]
    before = snapshot(data_dir)

    # A killed --rebuild: the old dataset comes back, nothing is lost.
    more = cases_folder(five_cases, tmp_path / "more", [0, 1, 2])
    killed_prepare(more, data_dir, rebuild=True)
    assert "1.0.0" not in os.listdir(root)  # moved aside meanwhile
    assert not dataset.prepare(cases, data_dir, CONFIG, workers=1).built
    assert snapshot(data_dir) == before


@pytest.mark.large  # prepare processes; test_empty_folder_is_one_line is fast
def test_no_usable_training_case_is_one_line(five_cases, tmp_path):
    """Every training case bad (skipped): exit 1, one line, and no dataset
    or folder left behind; an existing data folder is left as it was."""
    from kits_keras.data import prepare as dataset

    cases = cases_folder(five_cases, tmp_path / "cases", range(5))
    for i in range(4):  # case_00004 alone is a test case
        corrupt(os.path.join(cases, f"case_{i:05d}", io.IMAGE_FILE))
    data_dir = str(tmp_path / "tfds")
    result = run_cli(prepare_args(cases, data_dir, "--skip-bad-cases"))
    line = error_line(result)
    assert "no usable training case" in line and cases in line
    assert not os.path.exists(data_dir)

    os.makedirs(os.path.join(data_dir, "mine"))
    with open(os.path.join(data_dir, "mine", "keep.txt"), "w") as f:
        f.write("x")
    before = snapshot(data_dir)
    with pytest.raises(io.CaseError, match="no usable training case"):
        dataset.prepare(cases, data_dir, CONFIG, workers=1,
                        skip_bad_cases=True)
    assert snapshot(data_dir) == before
    assert sorted(os.listdir(data_dir)) == ["mine"]


def test_empty_folder_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    (empty / "case_00000").mkdir(parents=True)  # an image-less folder
    data_dir = str(tmp_path / "tfds")
    result = run_cli(prepare_args(str(empty), data_dir))
    assert "no case_XXXXX folder with segmentation.nii.gz" in error_line(
        result)
    assert not os.path.exists(data_dir)


def test_all_test_cases_bad_leaves_test_split_out(five_cases, tmp_path):
    from kits_keras.data import prepare as dataset

    cases = cases_folder(five_cases, tmp_path / "cases", range(5))
    corrupt(os.path.join(cases, "case_00004", io.IMAGE_FILE))
    result = dataset.prepare(cases, str(tmp_path / "tfds"), CONFIG,
                             workers=1, skip_bad_cases=True)
    assert result.num_examples == {"train": 4}
    assert list(result.skipped_cases) == ["case_00004"]
