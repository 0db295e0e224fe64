"""Ensembles: several models' probabilities averaged per tile."""

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from kits_keras import io
from kits_keras.inference import batch
from kits_keras.inference import predict
from kits_keras.inference.ensemble import Ensemble
from tests.conftest import save_cropped_ct
from tests.conftest import save_untrained_tiny_run


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two untrained tiny runs with different weights, same everything
    else."""
    root = tmp_path_factory.mktemp("ensemble_runs")
    return [save_untrained_tiny_run(root / f"seed{s}", seed=s)
            for s in (0, 1)]


@pytest.fixture(scope="module")
def small_ct(synthetic_cases_dir, tmp_path_factory):
    """A synthetic CT cropped to a few tiles of the tiny network."""
    return save_cropped_ct(synthetic_cases_dir, "case_00000",
                           tmp_path_factory.mktemp("ensemble_ct"))


def test_the_ensemble_predicts_the_mean_of_its_members(two_runs, small_ct):
    members = [batch.load_model(run) for run in two_runs]
    ensemble = batch.load_model(two_runs)
    assert isinstance(ensemble, Ensemble)
    assert ensemble.paths == [str(m.path) for m in members]
    volume = io.read_image(small_ct, ensemble.orientation)
    config = ensemble.config
    alone = [predict.predict_case(volume, m.network, config, m.stats)
             for m in members]
    both = predict.predict_case(volume, ensemble.network, config,
                                ensemble.stats)
    # The members disagree, so the mean is neither of them ...
    assert np.abs(alone[0].probabilities
                  - alone[1].probabilities).max() > 1e-2
    # ... and the sliding window is linear in the network's output.
    np.testing.assert_allclose(
        both.probabilities,
        (alone[0].probabilities + alone[1].probabilities) / 2, atol=1e-5)


def test_a_single_model_in_a_list_is_just_that_model(two_runs):
    art = batch.load_model(two_runs[:1])
    assert not isinstance(art, Ensemble)
    assert os.path.dirname(str(art.path)) == two_runs[0]


def _run_with(tmp_path, name, **changes):
    """An untrained tiny run whose stored config or statistics differ."""
    from kits_keras.artifact import save_artifact
    from kits_keras.config import get_config
    from kits_keras.config import override
    from kits_keras.data.intensity import IntensityStats
    from kits_keras.model.unet import build_unet

    stats = changes.pop("stats", IntensityStats(-100.0, 300.0, 100.0, 80.0))
    config = override(get_config("tiny"), **changes)
    path = tmp_path / name / "model.keras"
    save_artifact(build_unet(config), config, stats, str(path))
    return str(path.parent)


@pytest.mark.parametrize("name, changes, field", [
    ("patch", {"data": {"patch_size": (32, 96, 96)}}, "data.patch_size"),
    ("spacing", {"data": {"dataset": "interp_3.0x0.78mm"}},
     "data.target_spacing"),
    ("softmax", {"model": {"output_mode": "softmax"}}, "model.output_mode"),
    ("stats", {"stats": "other"}, "intensity statistics"),
])
def test_members_that_see_other_inputs_are_refused(two_runs, tmp_path, name,
                                                   changes, field):
    from kits_keras.data.intensity import IntensityStats

    if changes.get("stats") == "other":
        changes = {"stats": IntensityStats(-200.0, 400.0, 90.0, 70.0)}
    other = _run_with(tmp_path, name, **changes)
    with pytest.raises(ValueError, match=field) as err:
        batch.load_model([two_runs[0], other])
    assert other in str(err.value) and two_runs[0] in str(err.value)


def test_an_ensemble_mirrors_only_axes_every_member_was_trained_on(
        two_runs, tmp_path):
    from kits_keras.inference.sliding_window import mirror_axes

    left_right = _run_with(tmp_path, "x_only",
                           augment={"p_mirror": (0.0, 0.0, 0.5)})
    ensemble = batch.load_model([two_runs[0], left_right])
    assert ensemble.config.augment.mirrored_axes == (2,)
    assert mirror_axes("all", ensemble.config.augment.mirrored_axes) == [
        (), (2,)]
    assert batch.load_model(two_runs).config.augment.mirrored_axes == (
        0, 1, 2)


def test_cli_refuses_a_mismatched_ensemble_in_one_line(two_runs, small_ct,
                                                       tmp_path):
    from cli.infer import infer

    other = _run_with(tmp_path, "patch",
                      data={"patch_size": (32, 96, 96)})
    out = tmp_path / "seg.nii.gz"
    result = CliRunner().invoke(infer, [small_ct, "-o", str(out), "--model",
                                        two_runs[0], "--model", other])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "data.patch_size differs" in lines[0]
    assert not out.exists()


@pytest.mark.large  # three inferences through the CLI
def test_cli_ensemble_writes_the_mean_and_names_its_models(two_runs,
                                                           small_ct,
                                                           tmp_path):
    from cli.infer import infer

    ct = tmp_path / "ct.nii.gz"
    shutil.copy(small_ct, ct)
    probabilities = {}
    for name, models in (("a", two_runs[:1]), ("b", two_runs[1:]),
                         ("ab", two_runs)):
        out = tmp_path / name / "seg.nii.gz"
        args = [str(ct), "-o", str(out), "--tta", "flip",
                "--save-probabilities"]
        for model in models:
            args += ["--model", model]
        result = CliRunner().invoke(infer, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / name / "seg.json").read_text())
        assert [os.path.dirname(m) for m in report["models"]] == models
        probabilities[name] = np.load(
            tmp_path / name / "seg_probabilities.npz")["probabilities"]
    mean = (probabilities["a"].astype(np.float32)
            + probabilities["b"].astype(np.float32)) / 2
    # float16 files: within their rounding.
    np.testing.assert_allclose(probabilities["ab"], mean, atol=2e-3)


def test_segmenter_loads_an_ensemble(two_runs):
    from kits_keras.segmenter import Segmenter

    seg = Segmenter.load(two_runs, tta="none")
    assert isinstance(seg.artifact, Ensemble)
    ct = np.full((16, 48, 48), -1000.0, np.float32)  # (z, y, x) HU, air
    result = seg((ct, (4.0, 3.2, 3.2), np.eye(4)))
    assert result.model == " + ".join(seg.artifact.paths)
    assert result.labels.shape == ct.shape and not result.labels.any()
