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
"""

import os

import pytest

# Before any test module imports Keras: the package's backend default (JAX
# unless KERAS_BACKEND says otherwise) then holds for every test, whichever
# file runs first.
import kits_keras  # noqa: E402,F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC_SEED = 0
SYNTHETIC_CASES = 3


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
