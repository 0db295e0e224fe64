"""Tests of kits_keras/inference/export.py and saved_model.py: SavedModel
parity with Keras, loading an export back."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from kits_keras import artifact
from kits_keras import config as config_lib
from kits_keras.inference import export
from kits_keras.inference import saved_model
from kits_keras.backend import import_tensorflow
from kits_keras.data.intensity import IntensityStats

STATS = IntensityStats(clip_low=-79.0, clip_high=304.0, mean=101.0, std=76.9)


def assert_parity(actual, expected):
    """Export parity: 99.99 % of probabilities within 1e-5 of Keras, all
    within 2e-5. TensorFlow's XLA and JAX's XLA order float32 sums in the
    convolutions differently; a handful of voxels in 10^5 land just past
    1e-5 (measured: 2 of 393 216 at 1.1e-5), a broken export far beyond."""
    diff = np.abs(np.asarray(actual) - np.asarray(expected))
    assert diff.max() < 2e-5, diff.max()
    assert np.mean(diff > 1e-5) < 1e-4, np.mean(diff > 1e-5)


def _console_script(name):
    """A console script of this environment (installed with tensorflow)."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else shutil.which(name)


@pytest.fixture(scope="module")
def config():
    return config_lib.get_config("tiny")


@pytest.fixture(scope="module")
def model(config):
    import keras

    from kits_keras.model.unet import build_unet

    keras.utils.set_random_seed(0)
    return build_unet(config)


@pytest.fixture(scope="module")
def exported(model, config, tmp_path_factory):
    base = tmp_path_factory.mktemp("exports") / "kits"
    path = export.export_saved_model(
        model, str(base), config=config, stats=STATS
    )
    return base, path


def _keras_probs(model, batch):
    return np.asarray(model(batch, training=False)[0], dtype=np.float32)


def _random_patch(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_layout_and_metadata(exported, config):
    base, path = exported
    assert path == os.path.join(str(base), "1")
    assert sorted(os.listdir(base)) == ["1"]  # no temporary folder left
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    assert os.listdir(os.path.join(path, "variables"))
    with open(os.path.join(path, "assets", "kits_keras.json")) as fh:
        meta = json.load(fh)
    assert meta["intensity_stats"] == STATS.to_dict()
    assert meta["target_spacing"] == list(config.data.target_spacing)
    assert meta["patch_size"] == list(config.data.patch_size)
    assert meta["class_names"] == ["background", "kidney", "tumour"]
    assert meta["signature"]["spatial_multiple"] == [8, 8, 8]
    assert meta["orientation"] == "IPL"
    assert config_lib.ExperimentConfig.from_dict(meta["config"]) == config


def test_metadata_output_channels_follow_output_mode(config):
    softmax = config_lib.override(config, model={"output_mode": "softmax"})
    meta = export.metadata(softmax, STATS)
    assert meta["signature"]["output_shape"][-1] == 3
    assert meta["signature"]["output_mode"] == "softmax"
    # A region model of KiTS19 (tiny): two sigmoids (kidney + tumour,
    # tumour) for three labels.
    regions = config_lib.override(config, model={"output_mode": "regions"})
    meta = export.metadata(regions, STATS)
    assert meta["signature"]["output_shape"][-1] == 2
    assert meta["signature"]["output_mode"] == "regions"
    assert meta["class_names"] == ["background", "kidney", "tumour"]


def test_metadata_keeps_the_training_orientation(config):
    meta = export.metadata(config, STATS, orientation=("S", "A", "R"))
    assert meta["orientation"] == "SAR"
    assert artifact.orientation_of(meta) == ("S", "A", "R")


@pytest.fixture(scope="module")
def serving(exported):
    """The export's ``serving_default`` signature, loaded once (~10 s)."""
    tf = import_tensorflow()
    return tf.saved_model.load(exported[1]).signatures["serving_default"]


# A second, odd shape through the one dynamic signature: large (the Keras
# reference compiles per shape, ~10 s).
@pytest.mark.parametrize("shape", [(2, 32, 64, 64, 1), pytest.param(
    (1, 16, 24, 40, 1), marks=pytest.mark.large)])
def test_saved_model_matches_keras(serving, model, shape):
    tf = import_tensorflow()
    batch = _random_patch(shape)
    out = serving(image=tf.constant(batch))
    probs = out["probabilities"].numpy()
    expected = _keras_probs(model, batch)
    assert probs.shape == shape[:4] + (2,)  # tiny: two KiTS19 regions
    assert probs.dtype == np.float32
    assert expected.std() > 0.05  # not near-uniform
    assert_parity(probs, expected)


def test_signature_rejects_bad_spatial_size(serving):
    tf = import_tensorflow()
    with pytest.raises(tf.errors.InvalidArgumentError, match="multiple of"):
        serving(image=tf.zeros((1, 12, 64, 64, 1), tf.float32))


def test_refuses_existing_version(exported, model, config):
    base, path = exported
    before = os.path.getmtime(os.path.join(path, "saved_model.pb"))
    with pytest.raises(ValueError, match="already exists"):
        export.export_saved_model(model, base, config=config, stats=STATS)
    assert os.path.getmtime(os.path.join(path, "saved_model.pb")) == before


def test_bad_version_rejected(model, config, tmp_path):
    with pytest.raises(ValueError, match="positive integer"):
        export.export_saved_model(
            model, tmp_path, version=0, config=config, stats=STATS
        )


def test_failed_export_leaves_nothing(model, config, tmp_path, monkeypatch):
    def fail(path, meta):
        raise OSError("disk full")

    monkeypatch.setattr(export, "_write_metadata", fail)
    with pytest.raises(OSError, match="disk full"):
        export.export_saved_model(model, tmp_path, config=config, stats=STATS)
    assert os.listdir(tmp_path) == []
    # A base path the export created is removed again.
    with pytest.raises(OSError, match="disk full"):
        export.export_saved_model(model, tmp_path / "new", config=config,
                                  stats=STATS)
    assert os.listdir(tmp_path) == []


@pytest.mark.large  # its own export; the dynamic one is tested above
def test_fixed_size_export(model, config, tmp_path):
    path = export.export_saved_model(
        model, tmp_path, version=2, config=config, stats=STATS,
        fixed_size=True,
    )
    tf = import_tensorflow()
    signature = tf.saved_model.load(path).signatures["serving_default"]
    spec = signature.structured_input_signature[1]["image"]
    assert tuple(spec.shape) == (None, 32, 64, 64, 1)
    batch = _random_patch((1, 32, 64, 64, 1), seed=1)
    assert_parity(
        signature(image=tf.constant(batch))["probabilities"].numpy(),
        _keras_probs(model, batch),
    )


@pytest.mark.large  # saved_model_cli in a process
def test_saved_model_cli_show(exported):
    cli = _console_script("saved_model_cli")
    assert cli, "saved_model_cli (installed with tensorflow) not found"
    out = subprocess.run(
        [cli, "show", "--dir", exported[1], "--all"],
        capture_output=True, text=True, check=True,
    ).stdout
    block = out.split("signature_def['serving_default']:")[1]
    block = block.split("signature_def[")[0]
    inputs, outputs = block.split("The given SavedModel SignatureDef contains "
                                  "the following output(s):")
    assert "inputs['image'] tensor_info:" in inputs
    assert "dtype: DT_FLOAT" in inputs
    assert "shape: (-1, -1, -1, -1, 1)" in inputs
    assert "outputs['probabilities'] tensor_info:" in outputs
    assert "dtype: DT_FLOAT" in outputs
    assert "shape: (-1, -1, -1, -1, 2)" in outputs  # tiny: two regions


@pytest.mark.large  # saved_model_cli in a process
def test_saved_model_cli_run(exported, model, tmp_path):
    cli = _console_script("saved_model_cli")
    batch = _random_patch((1, 16, 32, 32, 1), seed=2)
    np.save(tmp_path / "patch.npy", batch)
    subprocess.run(
        [cli, "run", "--dir", exported[1], "--tag_set", "serve",
         "--signature_def", "serving_default",
         "--inputs", f"image={tmp_path / 'patch.npy'}",
         "--outdir", str(tmp_path / "out")],
        capture_output=True, text=True, check=True,
    )
    probs = np.load(tmp_path / "out" / "probabilities.npy")
    assert_parity(probs, _keras_probs(model, batch))


def test_load_saved_model(exported, model, config):
    base, _ = exported
    # The model base path resolves to its highest version, like TF Serving.
    art = saved_model.load_saved_model(base)
    assert art.config == config
    assert art.stats == STATS
    batch = _random_patch((2, 16, 32, 32, 1), seed=3)
    probs = art.network(batch)
    assert probs.dtype == np.float32
    assert_parity(probs, _keras_probs(model, batch))
    with pytest.raises(ValueError, match="B, z, y, x, 1"):
        art.network(batch[..., 0])
    # The one loader of inference recognises an export given as a model.
    from kits_keras.inference import batch

    loaded = batch.load_model(base)
    assert isinstance(loaded, saved_model.SavedModelArtifact)
    assert loaded.path == art.path


def test_load_rejects_foreign_folders(tmp_path):
    assert not saved_model.is_export(tmp_path)
    with pytest.raises(FileNotFoundError, match="no saved_model.pb"):
        saved_model.load_saved_model(tmp_path)
    (tmp_path / "saved_model.pb").write_bytes(b"")
    with pytest.raises(ValueError, match="not exported by kits-keras"):
        saved_model.load_saved_model(tmp_path)
    asset = tmp_path / "assets" / saved_model.ASSET_NAME
    asset.parent.mkdir()
    asset.write_text("{")
    with pytest.raises(ValueError, match=f"{asset}: not a kits-keras model"):
        saved_model.load_saved_model(tmp_path)
    meta = {"config": {}, "format": saved_model.FORMAT,
            "format_version": saved_model.FORMAT_VERSION + 1}
    asset.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{asset}: format_version"):
        artifact.read_metadata(tmp_path)


# --- CLI: kits-keras export, and infer --saved-model against --model -------


@pytest.fixture(scope="module")
def run_dir(model, config, tmp_path_factory):
    from kits_keras import artifact

    run = tmp_path_factory.mktemp("run")
    artifact.save_artifact(model, config, STATS,
                           str(run / artifact.MODEL_FILE))
    return run


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    """A synthetic CT cut to one tile of the tiny model (fast to segment)."""
    from kits_keras import io
    from kits_keras.synthetic import cases as synthetic

    image = synthetic.make_case(0).image
    z0 = image.array.shape[0] // 2 - 8
    crop = image.array[z0:z0 + 16, 24:88, 40:104]
    path = str(tmp_path_factory.mktemp("ct") / "ct.nii.gz")
    io.save_nifti(path, crop, image.affine, image.header,
                  image.orientation)
    return path


def _cli(*args):
    from click.testing import CliRunner

    from cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_export_run_dir(run_dir, tmp_path):
    result = _cli("export", run_dir, tmp_path / "served", "--version", 3)
    assert result.exit_code == 0, result.output
    path = tmp_path / "served" / "3"
    assert result.output.strip().endswith(str(path))
    meta = artifact.read_metadata(tmp_path / "served")
    assert meta["source"] == str(run_dir / "model.keras")
    assert meta["intensity_stats"] == STATS.to_dict()
    again = _cli("export", run_dir, tmp_path / "served", "--version", 3)
    assert again.exit_code == 1
    assert "already exists" in again.output


@pytest.mark.large  # infer processes on both artifacts
def test_infer_saved_model_matches_model(run_dir, exported, small_ct,
                                         tmp_path):
    from kits_keras import io

    segs = {}
    for flag, source in (("--model", run_dir),
                         ("--saved-model", exported[0])):
        out = tmp_path / f"{flag.strip('-')}.nii.gz"
        result = _cli("infer", small_ct, flag, source, "-o", out,
                      "--no-postprocess")
        assert result.exit_code == 0, result.output
        segs[flag] = io.read_labels(str(out)).array
    keras_seg, served_seg = segs["--model"], segs["--saved-model"]
    counts = np.bincount(keras_seg.ravel(), minlength=3)
    assert (counts > 100).sum() >= 2, counts  # a non-trivial segmentation
    # Identical up to float32 noise: with random weights a few voxels sit on
    # an argmax tie (top-2 probabilities within ~1e-5), which TF's and JAX's
    # XLA may break differently (2 of 65536 voxels when written); a trained
    # model has (almost) none. A wrong export differs in a large share.
    mismatch = int((keras_seg != served_seg).sum())
    assert mismatch <= 1e-3 * keras_seg.size, mismatch


def test_infer_rejects_model_and_saved_model(run_dir, exported, small_ct):
    result = _cli("infer", small_ct, "--model", run_dir, "--saved-model",
                  exported[0])
    assert result.exit_code == 1
    assert "exclude each other" in result.output
