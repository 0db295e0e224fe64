"""Tests of ``kits-keras prepare`` (kits_keras/data/prepare.py + the TFDS
builder) on small synthetic cases at the demo spacing."""

import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from kits_keras import io
from kits_keras.data import intensity
from kits_keras.data import preprocessing as pp

CONFIG = "demo_4.0x3.2mm"
NUM_CASES = 5  # sorted ids, index 4 -> test: case_00004


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
    """5 synthetic cases; the test case gets +300 HU so that statistics
    that looked at it would differ."""
    from kits_keras.synthetic import cases as synthetic

    out = str(tmp_path_factory.mktemp("cases"))
    synthetic.write_cases(out, NUM_CASES, seed=3, size="small")
    test_dir = os.path.join(out, "case_00004")
    image = io.read_image(os.path.join(test_dir, io.IMAGE_FILE))
    io.save_like(os.path.join(test_dir, io.IMAGE_FILE),
                 (image.array + 300).astype(np.int16), image)
    return out


def run_prepare(*args):
    from cli.main import main

    result = CliRunner().invoke(main, ["prepare", *args])
    return result


@pytest.fixture(scope="module")
def prepared(manual_dir, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    result = run_prepare("--manual-dir", manual_dir, "--data-dir", data_dir,
                         "--config", CONFIG, "--workers", "2")
    assert result.exit_code == 0, result.output
    return data_dir


def test_tfds_load_after_prepare(prepared):
    import tensorflow_datasets as tfds

    import tfds_kits19  # noqa: F401

    ds, info = tfds.load(f"kits19/{CONFIG}", data_dir=prepared,
                         split="train", with_info=True)
    assert info.splits["train"].num_examples == 4
    assert info.splits["test"].num_examples == 1
    fg = []
    for ex in tfds.as_numpy(ds):
        assert ex["image"].dtype == np.float16
        assert ex["image"].shape == ex["labels"].shape
        np.testing.assert_allclose(ex["spacing"], (4.0, 3.2, 3.2))
        expected = pp.target_shape(ex["original_shape"],
                                   ex["original_spacing"], ex["spacing"])
        assert ex["image"].shape == expected
        coords = ex["foreground_coords"]
        assert len(coords) > 0 and np.all(ex["labels"][tuple(coords.T)] > 0)
        assert np.all(ex["labels"][tuple(ex["tumour_coords"].T)] == 2)
        fg.append(ex["image"][ex["labels"] > 0].astype(np.float64))
    fg = np.concatenate(fg)
    # Standard at the original resolution (test_preprocessing); here after
    # resampling to 4 x 3.2 mm, which averages noise away and mixes the
    # border voxels with the fat around them (mean -0.14 with these cases
    # before tumours were sized like real ones, -0.21 after).
    assert abs(fg.mean()) < 0.3 and 0.75 < fg.std() < 1.1


def test_stats_ignore_test_cases_and_split(prepared, manual_dir):
    import tensorflow_datasets as tfds

    from tfds_kits19.kits19 import kits19_dataset_builder as kb

    builder = tfds.builder(f"kits19/{CONFIG}", data_dir=prepared)
    meta = builder.info.metadata
    assert meta["test_case_ids"] == ["case_00004"]
    assert meta["train_case_ids"] == [f"case_{i:05d}" for i in range(4)]
    voxels = builder.builder_config.stats_voxels
    train_only = intensity.stats_from_samples([
        kb.case_foreground_sample(os.path.join(manual_dir, c), voxels)
        for c in meta["train_case_ids"]])
    stored = intensity.IntensityStats.from_dict(meta["intensity_stats"])
    assert stored == train_only
    with_test = intensity.stats_from_samples([
        kb.case_foreground_sample(os.path.join(manual_dir, f"case_{i:05d}"),
                                  voxels) for i in range(5)])
    assert with_test.mean > train_only.mean + 10


def test_split_rule_is_deterministic():
    from tfds_kits19.kits19 import kits19_dataset_builder as kb

    ids = [f"case_{i:05d}" for i in range(210)]
    train, test = kb.split_case_ids(ids)
    assert (len(train), len(test)) == (168, 42)
    assert test[:2] == ["case_00004", "case_00009"]
    shuffled = list(np.random.default_rng(0).permutation(ids))
    assert kb.split_case_ids(shuffled) == (train, test)


def test_second_run_does_nothing(prepared, manual_dir):
    from cli.main import main  # noqa: F401

    folder = os.path.join(prepared, "kits19", CONFIG, "1.0.0")
    before = {f: os.path.getmtime(os.path.join(folder, f))
              for f in os.listdir(folder)}
    result = run_prepare("--manual-dir", manual_dir, "--data-dir", prepared,
                         "--config", CONFIG)
    assert result.exit_code == 0, result.output
    assert "already prepared" in result.output
    after = {f: os.path.getmtime(os.path.join(folder, f))
             for f in os.listdir(folder)}
    assert after == before


def test_bad_case_stops_or_is_skipped(manual_dir, tmp_path):
    cases = str(tmp_path / "cases")
    shutil.copytree(manual_dir, cases)
    bad = os.path.join(cases, "case_00002", io.IMAGE_FILE)
    with open(bad, "r+b") as fh:  # truncate the gzip stream
        fh.truncate(200)
    data_dir = str(tmp_path / "tfds")
    result = run_prepare("--manual-dir", cases, "--data-dir", data_dir,
                         "--config", CONFIG)
    assert result.exit_code == 1
    assert "case_00002" in result.output
    assert not os.path.exists(os.path.join(data_dir, "kits19", CONFIG,
                                           "1.0.0"))
    result = run_prepare("--manual-dir", cases, "--data-dir", data_dir,
                         "--config", CONFIG, "--skip-bad-cases")
    assert result.exit_code == 0, result.output
    assert "skipped case_00002" in result.output
    import tensorflow_datasets as tfds

    builder = tfds.builder(f"kits19/{CONFIG}", data_dir=data_dir)
    assert builder.info.splits["train"].num_examples == 3
    assert "case_00002" not in builder.info.metadata["train_case_ids"]


def test_interrupted_build_can_be_rerun(manual_dir, tmp_path, monkeypatch):
    from kits_keras.data import prepare as dataset
    from tfds_kits19.kits19 import kits19_dataset_builder as kb

    real = kb.process_case
    calls = []

    def flaky(case_dir, *args, **kwargs):
        calls.append(case_dir)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C
        return real(case_dir, *args, **kwargs)

    monkeypatch.setattr(kb, "process_case", flaky)
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(KeyboardInterrupt):
        dataset.prepare(manual_dir, data_dir, CONFIG, workers=1)
    # A failed first build leaves no folder (incomplete.* included).
    assert not os.path.exists(data_dir)
    monkeypatch.setattr(kb, "process_case", real)
    result = dataset.prepare(manual_dir, data_dir, CONFIG, workers=1)
    assert result.built and result.num_examples == {"train": 4, "test": 1}


def test_unknown_config_is_a_user_error(manual_dir, tmp_path):
    result = run_prepare("--manual-dir", manual_dir, "--data-dir",
                         str(tmp_path), "--config", "nope")
    assert result.exit_code == 1 and "nope" in result.output
