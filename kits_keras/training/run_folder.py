"""The run folder of ``kits-keras fit``: starting, resuming, restoring.

A run folder holds ``config.json`` (:data:`CONFIG_FILE`, written before
training starts), ``runtime.json`` (:data:`RUNTIME_FILE`: the backend,
oneDNN and allocator choices and why, the CPU), ``checkpoints/`` (``epoch_XXXX.keras`` and
``state.json``, :class:`kits_keras.training.callbacks.RunCheckpoint`) and
the artifact ``model.keras`` (:mod:`kits_keras.artifact`).
:func:`prepare_run` picks or checks the folder, :func:`write_config` starts
it, :func:`restore` resumes from its checkpoint, and :func:`process_folder`
gives a process of a multi-host run the folder it may write to.
"""

import contextlib
import logging
import os

from kits_keras import artifact
from kits_keras import files
from kits_keras.config import ExperimentConfig
from kits_keras.config import override
from kits_keras.training import callbacks as cb

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
RUNTIME_FILE = "runtime.json"


def prepare_run(config, out_dir, resume, changes=None):
    """``(run_dir, config, state)`` for a new or resumed run.

    ``changes`` (``{section: {field: value}}``, None values ignored) are
    applied with :func:`kits_keras.config.override` to ``config``, or when
    resuming without one to the run's stored config. Resuming takes the
    run's stored config, which the result may only differ from in
    ``train.epochs`` (to train longer). A new run refuses a folder that
    already holds checkpoints.
    """
    changes = changes or {}
    if resume:
        run_dir = out_dir or artifact.latest_run(
            member=os.path.join("checkpoints", cb.STATE_FILE))
        state = cb.read_state(os.path.join(run_dir, "checkpoints"))
        if state is None:
            raise FileNotFoundError(
                f"{run_dir}: no checkpoints/{cb.STATE_FILE} to resume from.")
        _check_checkpoint(run_dir, state)
        with open(os.path.join(run_dir, CONFIG_FILE)) as f:
            stored = ExperimentConfig.from_json(f.read())
        wanted = override(stored if config is None else config, **changes)
        if override(wanted, train={"epochs": stored.train.epochs}) != stored:
            raise ValueError(
                f"{run_dir}: config differs from the run's config.json "
                "(only --epochs may change on --resume).")
        return run_dir, wanted, state
    if config is None:
        raise ValueError("A config is needed to start a run.")
    config = override(config, **changes)
    run_dir = out_dir or artifact.new_run_dir(artifact.default_runs_root(),
                                              config.name)
    if cb.read_state(os.path.join(run_dir, "checkpoints")) is not None:
        raise ValueError(
            f"{run_dir}: already holds a run; pass --resume to continue it "
            "or choose another --out.")
    return run_dir, config, None


def write_runtime(run_dir):
    """Writes :data:`RUNTIME_FILE`: what ran the network and why
    (:func:`kits_keras.backend.describe`); a resumed run overwrites it
    with the resuming process's."""
    from kits_keras import backend

    files.write_json(os.path.join(run_dir, RUNTIME_FILE), backend.describe())


def write_config(run_dir, config):
    """Creates ``run_dir`` and writes ``config`` to its ``config.json``."""
    os.makedirs(run_dir, exist_ok=True)
    files.write_json(os.path.join(run_dir, CONFIG_FILE), config.to_dict())


def _check_checkpoint(run_dir, state):
    """Refuses a missing or damaged checkpoint before anything is written
    (the weights are only loaded once the dataset and model are built)."""
    import zipfile

    path = cb.checkpoint_path(os.path.join(run_dir, "checkpoints"), state)
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        damaged = files.first_line(err)
    if damaged:
        raise files.CaseError(
            f"{path}: cannot load this checkpoint (damaged: {damaged})")


def restore(model, run_dir, state, checkpoint):
    """Loads weights, optimizer and callback states; returns epochs done.

    Temporary files a killed run left in the run and checkpoint folders
    are removed first (:func:`kits_keras.files.sweep_temporaries`).
    """
    folder = os.path.join(run_dir, "checkpoints")
    for stale in (files.sweep_temporaries(run_dir)
                  + files.sweep_temporaries(folder)):
        log.info("Removed %s (left by an interrupted run)", stale)
    path = cb.checkpoint_path(folder, state)
    model.optimizer.build(model.trainable_variables)
    artifact.load_weights_strictly(model, path, "cannot load this checkpoint")
    checkpoint.restore(state)
    log.info("Resuming %s after epoch %d (learning rate %.3g)", run_dir,
             state["epochs_done"], float(model.optimizer.learning_rate))
    return int(state["epochs_done"])


@contextlib.contextmanager
def process_folder(run_dir, state, writes):
    """The folder this process's callbacks write to: ``run_dir`` for the
    writing process; for the others, a private temporary folder (removed
    afterwards) holding the checkpoint being resumed from."""
    if writes:
        yield run_dir
        return
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="kits-keras-process-")
    log.info("Not process 0: writes nothing to %s", run_dir)
    try:
        if state is not None:
            source = cb.checkpoint_path(os.path.join(run_dir, "checkpoints"),
                                        state)
            target = os.path.join(folder, "checkpoints", state["checkpoint"])
            os.makedirs(os.path.dirname(target))
            try:
                os.link(source, target)
            except OSError:  # another file system
                shutil.copyfile(source, target)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
