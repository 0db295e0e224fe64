"""The trained-model artifact and run directories.

A run directory (one training run) holds::

    RUN/model.keras          best model: weights + config + IntensityStats
    RUN/config.json          the experiment config
    RUN/checkpoints/         last checkpoint (weights, optimizer) + state.json
    RUN/history.csv          one row per epoch (losses, Dice, learning rate)
    RUN/logs/                TensorBoard logs (when TensorFlow is installed)
    RUN/loss_curves.png      training/validation loss, validation Dice

``model.keras`` is a normal Keras archive (``keras.saving.load_model`` reads
it) with one extra member, ``kits_keras.json``, carrying the experiment config,
the intensity statistics of the training set and the voxel orientation the
network was trained in (``"orientation"``, nibabel axis codes, ``"IPL"``
for KiTS19), so that :func:`load_artifact` needs nothing else to preprocess
a new CT.

This module imports Keras but never TensorFlow.
"""

import dataclasses
import json
import os
import re
import time
import zipfile

import numpy as np

from kits_keras import files
from kits_keras import io
from kits_keras.orientation import check_orientation
from kits_keras.config import ExperimentConfig

MODEL_FILE = "model.keras"
METADATA_MEMBER = "kits_keras.json"
FORMAT_VERSION = 1
ORIENTATION_KEY = "orientation"


def default_runs_root():
    """Where runs go by default: ``$KITS_KERAS_RUNS`` or ``./runs``."""
    return os.environ.get("KITS_KERAS_RUNS") or os.path.abspath("runs")


def new_run_dir(root, name):
    """A new, not yet existing ``root/<YYYYmmdd-HHMMSS>-<name>`` path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(root, f"{stamp}-{name}")
    suffix = 1
    while os.path.exists(path):
        path = os.path.join(root, f"{stamp}-{name}-{suffix}")
        suffix += 1
    return path


def latest_run(root=None, member=MODEL_FILE, finished=False):
    """The run under ``root`` whose ``member`` file was written last.

    Args:
        root: str. Runs folder. Defaults to :func:`default_runs_root`.
        member: str. File a run must hold to count (relative path).
        finished: bool. Only runs whose training ended (see
            :func:`run_finished`), not one still training or killed.

    Raises:
        FileNotFoundError: when no run under ``root`` qualifies.
    """
    root = root or default_runs_root()
    candidates = []
    if os.path.isdir(root):
        for entry in os.scandir(root):
            path = os.path.join(entry.path, member)
            if (entry.is_dir() and not entry.name.startswith(".")
                    and os.path.isfile(path)):
                candidates.append((os.path.getmtime(path), entry.path))
    done = [c for c in candidates if not finished or run_finished(c[1])]
    if not done:
        unfinished = ""
        if candidates:
            newest = max(candidates)[1]
            unfinished = (f" ({newest} is still training or was "
                          f"interrupted; pass it explicitly to use its "
                          f"best model so far)")
        raise FileNotFoundError(
            f"{root}: no {'finished ' if finished else ''}training run with "
            f"{member} found{unfinished}. Train one with `kits-keras fit` "
            "or pass the run folder / model file explicitly."
        )
    return max(done)[1]


STATE_FILE = "state.json"
STATE_PATH = os.path.join("checkpoints", STATE_FILE)
# What RunCheckpoint writes: a plain file name, no folder part.
_CHECKPOINT_NAME = re.compile(r"^epoch_\d{4,}\.keras$")


def read_state(checkpoint_dir):
    """The ``state.json`` dict of a checkpoint folder, or None.

    Raises:
        CaseError: unreadable JSON, ``epochs_done`` not a count, or a
            ``checkpoint`` that is not a plain ``.keras`` file name (a path
            such as ``../../x.keras`` would load, and later delete, a file
            outside the run).
    """
    path = os.path.join(checkpoint_dir, STATE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as err:
        raise io.CaseError(f"{path}: unreadable ({err})") from None
    if not isinstance(state, dict):
        raise io.CaseError(f"{path}: not a JSON object")
    name = state.get("checkpoint")
    if not (isinstance(name, str) and _CHECKPOINT_NAME.match(name)):
        raise io.CaseError(
            f"{path}: checkpoint {name!r} is not a file name inside "
            f"{checkpoint_dir} (expected epoch_XXXX.keras)")
    epochs = state.get("epochs_done")
    if type(epochs) is not int or epochs < 0:
        raise io.CaseError(f"{path}: epochs_done {epochs!r} is not a count")
    return state


def run_finished(run_dir):
    """Whether the training of ``run_dir`` ended normally.

    ``kits-keras fit`` marks ``checkpoints/state.json`` with ``finished``
    when training ends (not when it is killed); a run without a state file
    (a model saved outside ``fit``) counts as finished. For runs written
    before the mark existed, all configured epochs done counts as finished.
    """
    try:
        state = read_state(os.path.join(run_dir, "checkpoints"))
        if state is None:
            return True
        if "finished" in state:
            return bool(state["finished"])
        with open(os.path.join(run_dir, "config.json")) as f:
            epochs = json.load(f)["train"]["epochs"]
        return int(state["epochs_done"]) >= int(epochs)
    except (io.CaseError, OSError, ValueError, KeyError, TypeError):
        return False


def save_artifact(model, config, stats, path, extra=None,
                  orientation=io.KITS19_ORIENTATION):
    """Writes ``model`` as a Keras archive with the config and statistics.

    Atomic: written to a temporary file beside ``path`` and renamed.

    Args:
        model: keras.Model. The (multi-output) U-Net; save an uncompiled
            model to keep optimizer state out of the artifact.
        config: ExperimentConfig.
        stats: IntensityStats, a dict of its fields, or None.
        path: str. Target ``.keras`` file.
        extra: dict or None. More JSON-serialisable metadata (epoch, Dice).
        orientation: 3 nibabel axis codes of the training arrays (what
            :func:`kits_keras.io.read_volume` reoriented them to). Defaults
            to :data:`kits_keras.io.KITS19_ORIENTATION`.
    """
    if hasattr(stats, "to_dict"):
        stats = stats.to_dict()
    metadata = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "intensity_stats": stats,
        ORIENTATION_KEY: "".join(check_orientation(orientation)),
        **(extra or {}),
    }

    def write(tmp):
        # atomic_write keeps the .keras suffix, which Keras insists on.
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(METADATA_MEMBER, json.dumps(metadata))

    files.atomic_write(path, write)


def read_metadata(path):
    """The ``kits_keras.json`` dict stored with a model.

    Args:
        path: str. A ``.keras`` model archive (its ``kits_keras.json``
            member), or a ``kits-keras export`` folder, version folder or
            model base path (its ``assets/kits_keras.json``, see
            :func:`kits_keras.inference.export.metadata`).

    Raises:
        CaseError: naming the file: not written by kits-keras, damaged, or
            an export format newer than this kits-keras reads.
        FileNotFoundError: a folder that holds no SavedModel.
    """
    path = os.fspath(path)
    exported = os.path.isdir(path)
    if exported:
        from kits_keras.inference import saved_model

        folder = saved_model.resolve_version_dir(path)
        path = os.path.join(folder, "assets", saved_model.ASSET_NAME)
        if not os.path.exists(path):
            raise io.CaseError(
                f"{path}: missing; {folder} was not exported by kits-keras")
    try:
        if exported:
            with open(path) as fh:
                metadata = json.load(fh)
        else:
            with zipfile.ZipFile(path) as archive:
                metadata = json.loads(archive.read(METADATA_MEMBER))
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as err:
        raise io.CaseError(
            f"{path}: not a kits-keras model ({files.first_line(err)})."
        ) from None
    if not isinstance(metadata, dict) or "config" not in metadata:
        raise io.CaseError(
            f"{path}: no experiment config; not a kits-keras model, or a "
            "damaged one.")
    if exported:
        saved_model.check_format(metadata, path)
    return metadata


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A trained model with everything needed to segment a new CT.

    Attributes:
        model: keras.Model. The multi-output U-Net (full resolution first).
        config: ExperimentConfig.
        stats: IntensityStats (or its dict if that module is unavailable),
            or None for a model trained on in-memory data.
        path: str. The ``.keras`` file it came from.
        metadata: dict. Everything stored with it (epoch, validation Dice).
    """

    model: object
    config: ExperimentConfig
    stats: object
    path: str
    metadata: dict = dataclasses.field(default_factory=dict)

    @property
    def orientation(self):
        """Axis codes new CTs are reoriented to (:func:`orientation_of`)."""
        return orientation_of(self.metadata, self.path)

    @property
    def full_resolution(self):
        if "_full" not in self.__dict__:
            from kits_keras.model.layers import fuse_inference
            from kits_keras.model.unet import full_resolution_model

            # This process predicts with it: its normalisations may be
            # compiled (an export loads its own copy, op by op).
            object.__setattr__(
                self, "_full",
                fuse_inference(full_resolution_model(self.model))
            )
        return self.__dict__["_full"]

    def network(self, batch):
        """Full-resolution class probabilities of a batch of patches.

        Args:
            batch: np.ndarray float32 ``(B, z, y, x, 1)``, normalised
                intensities; spatial sizes divisible by the total stride.

        Returns:
            np.ndarray float32 ``(B, z, y, x, C)``. Compiled (jit) once per
            input shape.
        """
        probs = self.full_resolution.predict_on_batch(network_batch(batch))
        return np.asarray(probs, dtype=np.float32)


def network_batch(batch):
    """``batch`` as float32, checked to be ``(B, z, y, x, 1)``: the input
    of every network callable (``Artifact.network``, an export's).

    Raises:
        ValueError: for any other shape.
    """
    batch = np.asarray(batch, dtype=np.float32)
    if batch.ndim != 5 or batch.shape[-1] != 1:
        raise ValueError("network expects float32 (B, z, y, x, 1). "
                         f"Received: shape={batch.shape}")
    return batch


def orientation_of(metadata, path=""):
    """The training orientation stored in a model's metadata.

    Archives written before it was stored were trained on volumes read in
    KiTS19's layout: :data:`kits_keras.io.KITS19_ORIENTATION`.

    Raises:
        CaseError: when the stored value is not 3 axis codes.
    """
    codes = (metadata or {}).get(ORIENTATION_KEY, io.KITS19_ORIENTATION)
    try:
        return check_orientation(codes)
    except ValueError as err:
        raise io.CaseError(f"{path}: bad {ORIENTATION_KEY!r} in the model "
                           f"metadata: {err}") from None


def _model_path(path):
    if os.path.isdir(path):
        path = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no model file. Pass a run folder holding {MODEL_FILE} "
            "or the .keras file itself."
        )
    return path


def load_artifact(path=None):
    """Loads a model archive, or the best model of a run folder.

    The network is rebuilt from the stored config under the host's dtype
    policy (float32 on CPU even if it was trained in bfloat16 on a GPU)
    and the stored weights are loaded into it.

    Args:
        path: str or None. A run folder, a ``.keras`` file, or None for the
            latest finished run under :func:`default_runs_root`.

    Returns:
        Artifact.
    """
    from kits_keras.model.unet import build_unet

    path = _model_path(path or latest_run(finished=True))
    metadata = read_metadata(path)
    try:
        config = ExperimentConfig.from_dict(metadata["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise io.CaseError(
            f"{path}: damaged experiment config in {METADATA_MEMBER} "
            f"({type(err).__name__}: {files.first_line(err)})."
        ) from None
    model = build_unet(config)
    load_weights_strictly(model, path, "weights do not fit the stored config")
    return Artifact(
        model=model,
        config=config,
        stats=_stats(metadata.get("intensity_stats")),
        path=path,
        metadata=metadata,
    )


def load_weights_strictly(model, path, problem):
    """``model.load_weights(path)``; any mismatch is one CaseError line.

    Keras raises a message of hundreds of lines for weights of another
    shape, and only warns (leaving layers at their initial weights) for
    some missing ones; both become ``"<path>: <problem> (<first line>)"``.
    """
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(path)
        except (ValueError, KeyError, TypeError, OSError,
                zipfile.BadZipFile) as err:
            raise io.CaseError(
                f"{path}: {problem} ({files.first_line(err)})") from None
    skipped = [w for w in caught if "load" in str(w.message).lower()
               and issubclass(w.category, UserWarning)]
    if skipped:
        raise io.CaseError(
            f"{path}: {problem} ({files.first_line(skipped[0].message)})")


def _stats(d):
    if d is None:
        return None
    try:
        from kits_keras.data.intensity import IntensityStats
    except ImportError:
        return d
    return IntensityStats.from_dict(d)
