import os
import time
import zipfile

import numpy as np
import pytest

from kits_keras import artifact
from kits_keras import config as config_lib
from kits_keras.io import CaseError
from kits_keras.model.unet import build_unet
from kits_keras.data.intensity import IntensityStats

STATS = IntensityStats(clip_low=-80.0, clip_high=300.0, mean=100.0, std=50.0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = config_lib.get_config("tiny")
    model = build_unet(cfg)
    run = tmp_path_factory.mktemp("run")
    path = str(run / artifact.MODEL_FILE)
    artifact.save_artifact(model, cfg, STATS, path, extra={"epoch": 3})
    return cfg, model, str(run), path


def test_default_runs_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KITS_KERAS_RUNS", str(tmp_path))
    assert artifact.default_runs_root() == str(tmp_path)
    monkeypatch.delenv("KITS_KERAS_RUNS")
    assert artifact.default_runs_root() == os.path.abspath("runs")


def test_new_run_dir_is_dated_and_unique(tmp_path):
    first = artifact.new_run_dir(str(tmp_path), "tiny")
    os.makedirs(first)
    second = artifact.new_run_dir(str(tmp_path), "tiny")
    assert first != second and not os.path.exists(second)
    assert os.path.basename(first).startswith(time.strftime("%Y%m%d"))
    assert first.endswith("-tiny")


def test_latest_run_picks_newest_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="kits-keras fit"):
        artifact.latest_run(str(tmp_path))
    for i, name in enumerate(("b_old", "a_new")):
        os.makedirs(tmp_path / name)
        (tmp_path / name / artifact.MODEL_FILE).write_bytes(b"x")
        os.utime(tmp_path / name / artifact.MODEL_FILE, (i, i))
    os.makedirs(tmp_path / "no_model")
    assert artifact.latest_run(str(tmp_path)) == str(tmp_path / "a_new")


def test_archive_is_a_keras_file_with_metadata(saved):
    cfg, _, _, path = saved
    names = zipfile.ZipFile(path).namelist()
    assert artifact.METADATA_MEMBER in names and "config.json" in names
    meta = artifact.read_metadata(path)
    assert meta["epoch"] == 3
    assert config_lib.ExperimentConfig.from_dict(meta["config"]) == cfg
    # No leftover temporary files beside it.
    assert os.listdir(os.path.dirname(path)) == [artifact.MODEL_FILE]


def test_load_artifact_round_trip(saved):
    cfg, model, run, path = saved
    art = artifact.load_artifact(run)
    assert art.config == cfg and art.stats == STATS and art.path == path
    assert artifact.load_artifact(path).path == path
    for a, b in zip(model.get_weights(), art.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    batch = np.random.default_rng(0).normal(size=(2, 8, 16, 16, 1))
    probs = art.network(batch.astype("float32"))
    # tiny: one sigmoid per KiTS19 region (kidney + tumour, tumour).
    assert probs.dtype == np.float32 and probs.shape == (2, 8, 16, 16, 2)
    expected = model.predict_on_batch(batch.astype("float32"))[0]
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        art.network(np.zeros((8, 16, 16, 1), "float32"))


def test_load_rejects_missing_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model file"):
        artifact.load_artifact(str(tmp_path))
    bad = tmp_path / artifact.MODEL_FILE
    bad.write_bytes(b"not a zip")
    with pytest.raises(CaseError, match=str(bad)):
        artifact.load_artifact(str(bad))
