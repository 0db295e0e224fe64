"""What ``infer``, ``evaluate`` and ``fit --resume`` refuse (issue 13, 6-8).

Every row runs the real ``kits-keras`` (``tests/cli_harness.py``) and checks
the exit code, the one stderr line naming the file, the peak memory, and,
with a before/after snapshot, that nothing in the output location was
created or changed; in a batch, the good inputs are still segmented.
"""

import json
import os
import shutil
import zipfile

import numpy as np
import pytest
from tests.cli_harness import run_cli
from tests.cli_harness import snapshot

from kits_keras import files
from kits_keras import io

MAX_RSS_MB = 1024
INFER = ["--tta", "none", "--backend", "tensorflow"]


def _errors(result):
    return [line for line in result.error_lines
            if not line.startswith("Unable to initialize backend")]


def _refused(result, *names):
    """Exit 1, one stderr line naming every one of ``names``."""
    errors = _errors(result)
    assert result.returncode == 1, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    for name in names:
        assert str(name) in errors[0], errors[0]
    assert result.peak_rss_mb < MAX_RSS_MB
    return errors[0]


def _ct(path, seed=0):
    rng = np.random.default_rng(seed)
    array = rng.normal(40, 30, (40, 40, 12)).astype(np.float32)  # x, y, z
    io.save_nifti(str(path), array, np.diag([0.8, 0.8, 3.0, 1.0]))
    return str(path)


def _save_model(path, config=None, metadata_config=None):
    from kits_keras.artifact import save_artifact
    from kits_keras.config import get_config
    from kits_keras.model.unet import build_unet
    from kits_keras.data.intensity import IntensityStats

    config = config or get_config("tiny")
    stats = IntensityStats(clip_low=-100.0, clip_high=300.0, mean=100.0,
                           std=80.0)
    save_artifact(build_unet(config), metadata_config or config, stats,
                  str(path))
    return str(path)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return _save_model(root / "20260101-000000-tiny" / "model.keras")


# --- infer: outputs ------------------------------------------------------


def test_infer_same_name_from_two_folders_refused_before_work(
        model_file, tmp_path):
    a, b = _ct(tmp_path / "a" / "x.nii.gz"), _ct(tmp_path / "b" / "x.nii.gz")
    out = tmp_path / "out"
    result = run_cli(["infer", a, b, "-o", out, "--model", model_file,
                      *INFER])
    _refused(result, out / "x.nii.gz", a, b)
    assert not out.exists()


def test_infer_nii_beside_nii_gz_refused(model_file, tmp_path):
    _ct(tmp_path / "in" / "y.nii.gz")
    _ct(tmp_path / "in" / "y.nii", seed=1)
    before = snapshot(tmp_path / "in")
    result = run_cli(["infer", tmp_path / "in", "--model", model_file,
                      *INFER])
    _refused(result, "y_seg.nii.gz", "y.nii", "y.nii.gz")
    assert snapshot(tmp_path / "in") == before


def test_infer_output_onto_its_input_refused_even_with_overwrite(
        model_file, tmp_path):
    _ct(tmp_path / "in" / "case.nii.gz")
    before = snapshot(tmp_path / "in")
    result = run_cli(["infer", tmp_path / "in", "-o", tmp_path / "in",
                      "--overwrite", "--model", model_file, *INFER])
    _refused(result, "would replace the input", tmp_path / "in")
    assert snapshot(tmp_path / "in") == before


@pytest.mark.large  # two infer processes segmenting a batch
def test_infer_existing_sidecars_fail_their_case_others_segmented(
        model_file, tmp_path):
    inputs = tmp_path / "in"
    for i, name in enumerate("abcd"):
        _ct(inputs / f"{name}.nii.gz", seed=i)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.json").write_text("mine\n")
    (out / "b_probabilities.npz").write_bytes(b"mine")
    (out / "c.png").write_bytes(b"mine")
    before = snapshot(out)
    result = run_cli(["infer", inputs, "-o", out, "--model", model_file,
                      "--save-probabilities", "--preview", *INFER])
    assert result.returncode == 1, result.stderr[-3000:]
    for name in ("a.json", "b_probabilities.npz", "c.png"):
        assert any(f"FAILED {name[0]}: {out / name}: exists" in line
                   for line in _errors(result)), result.stderr[-3000:]
    after = snapshot(out)
    assert {k: after[k] for k in before} == before  # untouched
    assert set(after) - set(before) == {
        "d.nii.gz", "d.json", "d_probabilities.npz", "d.png",
        "summary.json"}
    # A second batch into the same folder: summary.json is an output too.
    _ct(tmp_path / "more" / "e.nii.gz")
    before = snapshot(out)
    result = run_cli(["infer", tmp_path / "more", "-o", out, "--model",
                      model_file, *INFER])
    _refused(result, out / "summary.json", "--overwrite")
    assert snapshot(out) == before


def test_infer_case_named_summary_collides_with_summary_json(
        model_file, tmp_path):
    _ct(tmp_path / "in" / "summary.nii.gz")
    out = tmp_path / "out"
    result = run_cli(["infer", tmp_path / "in", "-o", out, "--model",
                      model_file, *INFER])
    _refused(result, out / "summary.json", "batch summary")
    assert not out.exists()


# --- infer: temporaries and hidden files ----------------------------------


@pytest.mark.large  # an infer process segmenting
def test_infer_skips_hidden_files_and_sweeps_stale_temporaries(
        model_file, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    good = _ct(inputs / "case.nii.gz")
    # An old-style temporary of an interrupted write, an editor copy.
    shutil.copy(good, inputs / ".case.nii.gz.k3j2x9.nii.gz")
    shutil.copy(good, inputs / ".hidden.nii")
    out.mkdir()
    dead = _dead_pid()
    tag = f"{files.TEMP_TAG}{files._host_tag()}"
    stale = out / f".case.nii.gz{tag}.{dead}.ab.nii.gz"
    live = out / f".x.json{tag}.{os.getpid()}.cd.json"
    stale.write_bytes(b"partial")
    live.write_bytes(b"being written")
    result = run_cli(["infer", inputs, "-o", out, "--model", model_file,
                      *INFER])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [c["case_id"] for c in summary["cases"]] == ["case"]
    assert not stale.exists() and live.exists()
    assert sorted(os.listdir(out)) == [live.name, "case.json",
                                       "case.nii.gz", "summary.json"]


def _dead_pid():
    """The pid of a process that has ended."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- infer: which model ---------------------------------------------------


def _unfinished_run(root, name):
    """A run that is still training: state.json without ``finished``, and a
    model.keras that would fail to load if it were taken."""
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "model.keras").write_bytes(b"half written")
    (run / "checkpoints" / "state.json").write_text(json.dumps(
        {"epochs_done": 3, "checkpoint": "epoch_0003.keras"}))
    (run / "config.json").write_text(json.dumps({"train": {"epochs": 60}}))
    return run


@pytest.mark.large  # two infer processes, one segmenting
def test_infer_takes_latest_finished_run_and_says_which(model_file,
                                                        tmp_path):
    root = tmp_path / "runs"
    finished = root / "20260101-000000-tiny"
    finished.mkdir(parents=True)
    shutil.copy(model_file, finished / "model.keras")
    (finished / "checkpoints").mkdir()
    (finished / "checkpoints" / "state.json").write_text(json.dumps(
        {"epochs_done": 2, "checkpoint": "epoch_0002.keras",
         "finished": True}))
    training = _unfinished_run(root, "20260102-000000-tiny")
    ct = _ct(tmp_path / "in" / "ct.nii.gz")
    result = run_cli(["infer", ct, *INFER],
                     env={"KITS_KERAS_RUNS": str(root)})
    assert result.returncode == 0, result.stderr[-3000:]
    line = [x for x in result.stderr.splitlines() if "Using the" in x]
    assert len(line) == 1, result.stderr[-3000:]
    assert f"latest finished run: {finished}" in line[0]
    assert training.name in line[0] and "still training" in line[0]
    shutil.rmtree(finished)
    out = tmp_path / "out"
    result = run_cli(["infer", ct, "-o", out / "seg.nii.gz", *INFER],
                     env={"KITS_KERAS_RUNS": str(root)})
    _refused(result, training, "still training")
    assert not out.exists()


# The same one-line path refuses all three.
@pytest.mark.large  # an infer process each; test_artifact refuses in process
@pytest.mark.parametrize("damage", ["no_config", "not_zip", "mismatch"])
def test_infer_damaged_model_one_line(damage, model_file, tmp_path):
    from kits_keras.config import get_config
    from kits_keras.config import override

    path = tmp_path / "model.keras"
    if damage == "no_config":
        with zipfile.ZipFile(model_file) as src, zipfile.ZipFile(
                path, "w") as dst:
            for name in src.namelist():
                data = src.read(name)
                if name == "kits_keras.json":  # metadata without "config"
                    data = json.dumps({"format_version": 1})
                dst.writestr(name, data)
    elif damage == "not_zip":
        path.write_bytes(b"\0" * 100)
    else:
        tiny = get_config("tiny")
        _save_model(path, metadata_config=override(
            tiny, model={"base_filters": 4, "max_filters": 32}))
    ct = _ct(tmp_path / "in" / "ct.nii.gz")
    before = snapshot(tmp_path / "in")
    result = run_cli(["infer", ct, "--model", path, *INFER])
    line = _refused(result, path)
    assert len(line) < 400, line
    assert snapshot(tmp_path / "in") == before


# --- evaluate -------------------------------------------------------------


@pytest.fixture
def truth(tmp_path):
    """Two ground-truth case folders, each with its CT."""
    folder = tmp_path / "gt"
    for i in range(2):
        case = folder / f"case_{i:05d}"
        labels = np.zeros((40, 40, 12), np.uint8)
        labels[10:20, 10:20, 3:8] = 1
        labels[12:15, 12:15, 4:6] = 2
        affine = np.diag([0.8, 0.8, 3.0, 1.0])
        io.save_nifti(str(case / io.LABELS_FILE), labels, affine)
        _ct(case / io.IMAGE_FILE, seed=i)
    return folder


def _perfect(truth, pred):
    for case in sorted(os.listdir(truth)):
        pred.mkdir(exist_ok=True)
        shutil.copy(truth / case / io.LABELS_FILE, pred / f"{case}.nii.gz")


def test_evaluate_empty_prediction_folder(truth, tmp_path):
    (tmp_path / "pred").mkdir()
    result = run_cli(["evaluate", tmp_path / "pred", truth, "--out",
                      tmp_path / "out"])
    _refused(result, tmp_path / "pred", "no predictions")
    assert not (tmp_path / "out").exists()


def test_evaluate_ignores_hidden_temporary_beside_prediction(truth,
                                                             tmp_path):
    pred = tmp_path / "pred"
    _perfect(truth, pred)
    empty = np.zeros((40, 40, 12), np.uint8)
    io.save_nifti(str(pred / ".case_00000.nii.gz.x8f2k1.nii.gz"), empty,
                  np.diag([0.8, 0.8, 3.0, 1.0]))
    result = run_cli(["evaluate", pred, truth, "--out", tmp_path / "out"])
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["mean"]["composite"] == 1.0


def test_evaluate_two_files_for_one_case(truth, tmp_path):
    pred = tmp_path / "pred"
    _perfect(truth, pred)
    shutil.copy(pred / "case_00001.nii.gz", pred / "prediction_00001.nii.gz")
    result = run_cli(["evaluate", pred, truth, "--out", tmp_path / "out"])
    _refused(result, pred / "case_00001.nii.gz",
             pred / "prediction_00001.nii.gz")
    assert not (tmp_path / "out").exists()


def test_evaluate_keeps_an_earlier_report_unless_overwrite(truth, tmp_path):
    pred, out = tmp_path / "pred", tmp_path / "out"
    _perfect(truth, pred)
    out.mkdir()
    (out / "scores.json").write_text("{}\n")
    (out / "overlay_best_case_00007.png").write_bytes(b"old")
    before = snapshot(out)
    result = run_cli(["evaluate", pred, truth, "--out", out])
    _refused(result, out / "overlay_best_case_00007.png", "--overwrite")
    assert snapshot(out) == before
    result = run_cli(["evaluate", pred, truth, "--out", out, "--overwrite"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "scores.json").read_text())["num_cases"] == 2
    assert not (out / "overlay_best_case_00007.png").exists()  # stale rank


def test_evaluate_ct_on_another_grid_is_that_cases_error(truth, tmp_path):
    pred, out = tmp_path / "pred", tmp_path / "out"
    _perfect(truth, pred)
    bad_ct = truth / "case_00001" / io.IMAGE_FILE
    io.save_nifti(str(bad_ct), np.zeros((30, 40, 12), np.float32),
                  np.diag([0.8, 0.8, 3.0, 1.0]))
    result = run_cli(["evaluate", pred, truth, "--out", out])
    assert result.returncode == 1
    assert any(str(bad_ct) in line and "another grid" in line
               for line in _errors(result)), result.stderr[-3000:]
    rows = json.loads((out / "scores.json").read_text())["cases"]
    assert [r["status"] for r in rows] == ["ok", "error"]


def test_evaluate_no_prediction_matches(truth, tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(truth / "case_00000" / io.LABELS_FILE,
                pred / "case_00042.nii.gz")
    result = run_cli(["evaluate", pred, truth, "--out", tmp_path / "out"])
    _refused(result, pred, "no prediction matches")
    assert not (tmp_path / "out").exists()


# --- fit --resume ---------------------------------------------------------


@pytest.mark.large  # a fit process each (~7 s on 2 cores)
@pytest.mark.parametrize("state, message", [
    ({"epochs_done": 1, "checkpoint": "../../victim/precious.keras"},
     "is not a file name inside"),
    ({"epochs_done": 1, "checkpoint": "/tmp/precious.keras"},
     "is not a file name inside"),
    ({"epochs_done": "1", "checkpoint": "epoch_0001.keras"},
     "is not a count"),
    ("{not json", "unreadable"),
])
def test_fit_resume_refuses_a_bad_state_json(state, message, tmp_path):
    victim = tmp_path / "victim" / "precious.keras"
    victim.parent.mkdir()
    victim.write_bytes(b"precious")
    from kits_keras.config import get_config

    run = tmp_path / "runs" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(get_config("tiny").to_dict()))
    text = state if isinstance(state, str) else json.dumps(state)
    (run / "checkpoints" / "state.json").write_text(text)
    before = snapshot(tmp_path)
    result = run_cli(["fit", "--data-dir", tmp_path / "data", "--resume",
                      "--out", run, "--backend", "tensorflow"])
    _refused(result, run / "checkpoints" / "state.json", message)
    assert snapshot(tmp_path) == before


@pytest.mark.large
def test_fit_resume_sweeps_temporaries_and_marks_finished(prepared_five_dir,
                                                          tmp_path):
    """A killed run's temporaries go on resume; state.json says finished
    only when training ends; a damaged checkpoint is one line."""
    from kits_keras.training import callbacks as cb
    from kits_keras import config as config_lib
    from kits_keras.training import fit as training

    data = prepared_five_dir
    config = config_lib.override(
        config_lib.get_config("tiny"), data={"patch_size": (16, 32, 32)},
        train={"epochs": 1, "steps_per_epoch": 1, "batch_size": 1})
    run = tmp_path / "run"
    training.fit(config, data, out_dir=str(run), verbose=0)
    ckpt = run / "checkpoints"
    assert cb.read_state(str(ckpt))["finished"] is True
    tag = f"{files.TEMP_TAG}{files._host_tag()}.{_dead_pid()}"
    stale = [ckpt / f".epoch_0002.keras{tag}.ab.keras",
             run / f".model.keras{tag}.cd.keras"]
    for path in stale:
        path.write_bytes(b"partial")
    result = run_cli(["fit", "--data-dir", data, "--resume", "--out", run,
                      "--epochs", "2", "--backend", "tensorflow"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any(path.exists() for path in stale)
    state = cb.read_state(str(ckpt))
    assert state["epochs_done"] == 2 and state["finished"] is True
    (ckpt / state["checkpoint"]).write_bytes(b"damaged")
    before = snapshot(run)
    result = run_cli(["fit", "--data-dir", data, "--resume", "--out", run,
                      "--epochs", "3", "--backend", "tensorflow"])
    # fit logs its progress (INFO) on stderr: the failure is the one
    # "Error:" line, with no traceback.
    errors = [x for x in result.stderr.splitlines() if x.startswith("Error")]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(errors) == 1, result.stderr[-3000:]
    assert str(ckpt / state["checkpoint"]) in errors[0]
    assert "cannot load" in errors[0]
    after = snapshot(run)
    assert {k: v for k, v in after.items() if not k.startswith("logs")} == {
        k: v for k, v in before.items() if not k.startswith("logs")}
