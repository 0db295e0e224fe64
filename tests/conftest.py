"""Shared pytest fixtures.

``synthetic_cases_dir``: a session-wide folder with 3 small synthetic KiTS19
cases (``case_00000`` .. ``case_00002``, seed 0), written once by
:func:`kits_keras.synthetic.cases.write_cases`. Treat it as read-only; copy it
(``shutil.copytree``) before modifying anything.

:func:`save_untrained_tiny_run`: an untrained ``tiny`` U-Net saved as a run
folder (``model.keras``), for tests of the CLI's behaviour rather than of
the segmentation.

``kits19_labels_dir``: the real KiTS19 label volumes shared on this machine
(``$KITS19_LABELS``, default ``<repo>/../shared/data/kits19-labels``); the
test is skipped when the folder is absent. Never copy them into the repo.

``five_cases_dir`` / ``prepared_five_dir``: 5 small synthetic cases (seed 0)
and the ``tiny`` config's TFDS dataset prepared from them (4 train cases, of
which 1 is held out for validation, 1 test: ``case_00004``), built once per
session for every test that needs that dataset. Read-only, like the above.

The package's docstring examples run as doctests (``--doctest-modules``,
see pyproject.toml): :func:`pytest_collection_modifyitems` skips those that
need an optional extra which is not installed or the JAX backend when
another one is in use, and marks the slow ones ``large``.
"""

import atexit
import importlib.util
import os
import shutil
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Before JAX is imported, here or in the processes tests start: one
# compilation cache for the workers and subprocesses of this run, so the
# tiny U-Net's step is compiled once, not by every test that builds it
# (~20% of the training tests' time on 2 cores). A fresh folder per run,
# removed at its end: JAX's cache has no lock without filelock, and an
# entry cut short by a killed process, or compiled for another CPU, must
# not outlive the run.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _JAX_CACHE = tempfile.mkdtemp(prefix="kits-keras-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE
    atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

# Before any test module imports Keras: the package's backend default (JAX
# unless KERAS_BACKEND says otherwise) then holds for every test, whichever
# file runs first.
import kits_keras  # noqa: E402,F401

SYNTHETIC_SEED = 0
SYNTHETIC_CASES = 3

# Doctests (by module) that need an optional extra: skipped without it.
DOCTEST_EXTRAS = {
    "kits_keras.dicom.read": ("pydicom",),
    "kits_keras.dicom.write": ("pydicom", "highdicom"),
}
# Doctests that need the JAX backend (skipped under another KERAS_BACKEND).
DOCTEST_JAX = ("kits_keras.training.step",)
# Doctests over ~5 s on 2 CPU cores: XLA compiles a 3-D U-Net's backward
# pass (~20-30 s). tests/training/test_step.py covers the step in more depth.
DOCTEST_LARGE = ("kits_keras.training.step",)


def _doctest_module(item):
    """Module name of a doctest item, or None for other tests."""
    dtest = getattr(item, "dtest", None)
    return None if dtest is None else dtest.globs.get("__name__")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = _doctest_module(item)
        if module is None:
            continue
        missing = [name for name in DOCTEST_EXTRAS.get(module, ())
                   if importlib.util.find_spec(name) is None]
        if missing:
            item.add_marker(pytest.mark.skip(
                reason=f"needs {', '.join(missing)} (pip install "
                "'kits-keras[dicom]')"))
        if module in DOCTEST_JAX and os.environ.get(
                "KERAS_BACKEND", "jax") != "jax":
            item.add_marker(pytest.mark.skip(reason="needs the JAX backend"))
        if module in DOCTEST_LARGE:
            item.add_marker(pytest.mark.large)


def kits19_labels_path():
    """Where the real label volumes are expected (may not exist)."""
    return os.environ.get(
        "KITS19_LABELS",
        os.path.join(os.path.dirname(REPO), "shared", "data",
                     "kits19-labels"),
    )


@pytest.fixture(scope="session")
def synthetic_cases_dir(tmp_path_factory):
    """Folder holding 3 small synthetic cases (seed 0); do not modify."""
    from kits_keras.synthetic import cases as synthetic

    out = tmp_path_factory.mktemp("synthetic_cases")
    synthetic.write_cases(str(out), SYNTHETIC_CASES, seed=SYNTHETIC_SEED,
                          size="small")
    return str(out)


@pytest.fixture(scope="session")
def five_cases_dir(tmp_path_factory):
    """Folder holding 5 small synthetic cases (seed 0); do not modify."""
    from kits_keras.synthetic import cases as synthetic

    out = tmp_path_factory.mktemp("five_cases")
    synthetic.write_cases(str(out), 5, seed=0, size="small")
    return str(out)


@pytest.fixture(scope="session")
def prepared_five_dir(five_cases_dir, tmp_path_factory):
    """TFDS data dir of ``five_cases_dir`` prepared for ``tiny``
    (``kits19/demo_4.0x3.2mm``); do not modify."""
    from kits_keras.data import prepare as dataset

    out = tmp_path_factory.mktemp("tfds_five")
    dataset.prepare(five_cases_dir, str(out), "tiny", workers=1)
    return str(out)


@pytest.fixture(scope="session")
def kits19_labels_dir():
    """Folder of real ``case_XXXXX/segmentation.nii.gz``; skips if absent."""
    path = kits19_labels_path()
    if not os.path.isdir(path):
        pytest.skip(f"real KiTS19 labels not found at {path} "
                    "(set KITS19_LABELS)")
    return path


def save_untrained_tiny_run(run_dir, seed=0):
    """Saves an untrained ``tiny`` U-Net (fixed seed) as ``run_dir/model.keras``
    with plausible CT statistics; returns ``run_dir`` as str."""
    import keras

    from kits_keras.artifact import save_artifact
    from kits_keras.config import get_config
    from kits_keras.model.unet import build_unet
    from kits_keras.data.intensity import IntensityStats

    keras.utils.set_random_seed(seed)
    config = get_config("tiny")
    stats = IntensityStats(clip_low=-100.0, clip_high=300.0, mean=100.0,
                           std=80.0)
    save_artifact(build_unet(config), config, stats,
                  os.path.join(str(run_dir), "model.keras"))
    return str(run_dir)


def save_cropped_ct(cases_dir, case_id, folder, name="ct.nii.gz"):
    """Saves the first 24 slices and 96 x 96 voxels of a synthetic case's
    CT (a few tiles of the ``tiny`` network: tests of behaviour, not of
    segmentation, stay fast) as ``folder/name``; returns its path."""
    from kits_keras import io

    ct = io.read_image(os.path.join(cases_dir, case_id, io.IMAGE_FILE))
    path = str(os.path.join(folder, name))
    io.save_nifti(path, ct.array[:24, 16:112, 16:112], ct.affine, ct.header,
                  ct.orientation)
    return path
