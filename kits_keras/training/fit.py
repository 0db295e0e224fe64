"""Training the multi-scale supervised U-Net: ``kits-keras fit``.

Small functions, one job each: :func:`setup_distribution` (data parallel over
devices, multi-host), :func:`build_dataset`, :func:`build_model`,
:func:`compile_model`, :func:`make_callbacks`, :func:`train` (the loop on any
data) and :func:`fit` (everything from a prepared dataset folder).

Schedule (paper): Adam 3e-4, x0.2 when the training loss has not improved for
``lr_patience`` epochs, ``steps_per_epoch`` iterations per epoch. Epoch ``e``
draws its patches from a data stream seeded by ``(seed, e)`` alone, so a
resumed run sees the same batches as an uninterrupted one.

Keras must be imported after the backend is chosen
(:func:`kits_keras.backend.select_backend`); the CLI imports this module
lazily for that reason. Nothing here imports TensorFlow except through the
data pipeline and the optional TensorBoard logger.
"""

import contextlib
import dataclasses
import importlib.util
import logging
import os
import warnings

import keras
import numpy as np

from kits_keras import artifact
from kits_keras import backend as backend_lib
from kits_keras import files
from kits_keras.training import callbacks as cb
from kits_keras.config import ExperimentConfig
from kits_keras.config import override

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Multi-host training on JAX's distributed runtime.

    Every process builds the same model from the same seed, reads its own
    rows of every global batch (:func:`kits_keras.data.pipeline.shard_rows`) and
    applies the same all-reduced update. Process 0 alone writes the run
    folder; on ``--resume`` every process reads it (share it).
    ``docs/multihost.md`` says how to launch one.

    Attributes:
        coordinator_address: str. ``host:port`` of process 0.
        num_processes: int. Processes (hosts) in the job.
        process_id: int. This process, ``0 .. num_processes - 1``.
        heartbeat_timeout_s: int. Seconds without news from a process after
            which the others stop with an error (a process that died).
    """

    coordinator_address: str
    num_processes: int
    process_id: int
    heartbeat_timeout_s: int = 60

    def __post_init__(self):
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(
                "process_id must be in 0 .. num_processes - 1. Received: "
                f"process_id={self.process_id}, "
                f"num_processes={self.num_processes}")

    @property
    def writes(self):
        """True for process 0, the one that writes the run folder."""
        return self.process_id == 0


class ClusterError(RuntimeError):
    """A multi-process run lost a process (it died, or its host or network
    went down): every process stops; restart them all with ``--resume``."""


def initialize_cluster(cluster):
    """Starts JAX's distributed runtime (before any JAX computation).

    CPU processes exchange gradients through gloo; GPUs through NCCL.
    """
    import jax

    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # older JAX: no CPU collectives option
        pass
    import inspect

    options = {}
    if "heartbeat_timeout_seconds" in inspect.signature(
            jax.distributed.initialize).parameters:  # newer JAX only
        options["heartbeat_timeout_seconds"] = cluster.heartbeat_timeout_s
    jax.distributed.initialize(
        coordinator_address=cluster.coordinator_address,
        num_processes=cluster.num_processes,
        process_id=cluster.process_id,
        **options,
    )
    log.info("Process %d of %d joined %s", jax.process_index(),
             jax.process_count(), cluster.coordinator_address)


def weights_digest(model):
    """SHA-256 of the model's and optimizer's variables (hex, 16 digits):
    equal on every process of a multi-process run."""
    import hashlib

    digest = hashlib.sha256()
    variables = list(model.weights)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    for v in variables:
        digest.update(np.ascontiguousarray(np.asarray(v)).tobytes())
    return digest.hexdigest()[:16]


def epoch_seed(seed, epoch):
    """The data seed of epoch ``epoch``: depends on ``(seed, epoch)`` only."""
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)
    return int(state[0] % (2**31 - 1))


def setup_distribution(gpus, cluster=None, batch_size=None):
    """Sets ``keras.distribution.DataParallel`` over ``gpus`` devices.

    Args:
        gpus: int. Devices of this process to train on; 1 means no
            distribution (unless ``cluster`` is given).
        cluster: Cluster or None. With several processes, the mesh spans
            ``gpus`` devices of every process.
        batch_size: int or None. Global batch; must split evenly.

    Returns the distribution, or None.
    """
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1. Received: gpus={gpus}")
    if cluster is not None:
        initialize_cluster(cluster)
    processes = cluster.num_processes if cluster else 1
    if gpus * processes == 1:
        return None
    if keras.backend.backend() != "jax":
        raise ValueError(
            "Data-parallel training (--gpus > 1 or several processes) needs "
            f"the JAX backend. Received: backend={keras.backend.backend()!r}"
        )
    import jax

    local = jax.local_devices()
    if gpus > len(local):
        raise ValueError(
            f"--gpus {gpus} asks for more devices than this host has: "
            f"{len(local)} ({', '.join(str(d) for d in local)})."
        )
    by_process = {}
    for device in jax.devices():
        by_process.setdefault(device.process_index, []).append(device)
    chosen = [d for p in sorted(by_process) for d in by_process[p][:gpus]]
    if batch_size is not None and batch_size % len(chosen):
        raise ValueError(
            f"The batch ({batch_size}) must split evenly over {len(chosen)} "
            f"devices. Received: gpus={gpus}, batch_size={batch_size}")
    names = [f"{d.platform}:{d.id}" for d in chosen]
    # Several processes: each feeds its own rows (kits_keras.data.pipeline's
    # shard), not a copy of one dataset for Keras to shard.
    distribution = keras.distribution.DataParallel(
        devices=names, auto_shard_dataset=processes == 1)
    keras.distribution.set_distribution(distribution)
    log.info("Data parallel over %d devices: %s", len(names), names)
    return distribution


def describe_sharding(distribution, batch_shape):
    """``[(device, shard shape)]`` of this process's devices for a batch of
    ``batch_shape`` fed by this process, placed as Keras' JAX trainer places
    every batch (``jax.make_array_from_process_local_data``)."""
    import jax

    global_shape = (batch_shape[0] * jax.process_count(), *batch_shape[1:])
    layout = distribution.get_data_layout(global_shape)
    array = jax.make_array_from_process_local_data(
        layout.backend_layout, np.zeros(batch_shape, np.float32))
    return [(str(s.device), tuple(s.data.shape))
            for s in array.addressable_shards]


def set_precision():
    """mixed_bfloat16 when JAX has a GPU/TPU, float32 otherwise."""
    use_bf16 = (keras.backend.backend() == "jax"
                and backend_lib.has_accelerator())
    policy = "mixed_bfloat16" if use_bf16 else "float32"
    keras.config.set_dtype_policy(policy)
    return policy


def build_dataset(config, data_dir, seed, full_batches=False, shard=None):
    """Per-epoch training datasets and the validation dataset.

    Args:
        config: ExperimentConfig.
        data_dir: str. TFDS data folder prepared by ``kits-keras prepare``.
        seed: int.
        full_batches: bool. Drop a short last validation batch (data
            parallel: it could not be split evenly over the devices).
        shard: ``(process_id, num_processes)`` or None: multi-process
            training, each process reading its rows of every batch.

    Returns:
        ``(epoch_dataset, validation)``: ``epoch_dataset(epoch)`` gives the
        training ``tf.data.Dataset`` of that epoch; ``validation`` is finite,
        or None when the dataset has too few cases to hold any out.
    """
    from kits_keras.data import pipeline as data

    def epoch_dataset(epoch):
        return data.make_train_dataset(config, data_dir,
                                       seed=epoch_seed(seed, epoch),
                                       shard=shard)

    validation = data.make_validation_dataset(config, data_dir)
    if full_batches and validation is not None:
        validation = validation.unbatch().batch(
            config.train.batch_size, drop_remainder=True)
        if shard is not None:  # un-augmented and few: cut, then shared out
            n = config.train.batch_size // shard[1]
            rows = slice(shard[0] * n, (shard[0] + 1) * n)
            validation = validation.map(
                lambda x, ys: (x[rows], tuple(y[rows] for y in ys)))
    return epoch_dataset, validation


def epoch_batches(epoch_dataset, initial_epoch, epochs, steps):
    """Yields ``steps`` numpy batches of each epoch from ``initial_epoch``."""
    for epoch in range(initial_epoch, epochs):
        ds = epoch_dataset(epoch).repeat().take(steps)
        yield from ds.as_numpy_iterator()


def intensity_stats(config, data_dir):
    """The training set's IntensityStats dict from the TFDS metadata."""
    from kits_keras.data.pipeline import prepared_builder

    builder = prepared_builder(config, data_dir)
    return (builder.info.metadata or {}).get("intensity_stats")


def build_model(config, seed):
    """The U-Net of ``config`` with weights initialised from ``seed``."""
    from kits_keras.model.unet import build_unet

    keras.utils.set_random_seed(int(seed))
    return build_unet(config)


def compile_model(model, config):
    """Adam, the multi-scale exp-log loss, region Dice on the full-res output.

    The loss of output ``i`` is weighted by ``deep_supervision_weights``
    (halving per level, normalised).
    """
    from kits_keras.model.losses import ExpLogLoss
    from kits_keras.model.losses import deep_supervision_weights
    from kits_keras.model.metrics import RegionDice

    n = len(model.outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(config.train.learning_rate),
        loss=[ExpLogLoss.from_loss_config(config.loss) for _ in range(n)],
        loss_weights=deep_supervision_weights(n),
        metrics=[[RegionDice("kidney"), RegionDice("tumour")]]
        + [[] for _ in range(n - 1)],
    )
    return model


def make_callbacks(run_dir, config, stats, seed, volume_validator=None):
    """The callbacks of a run, in the order they must run.

    ``volume_validator`` (or None) runs every
    ``config.train.volume_validation_every`` epochs.

    Returns ``(callbacks, checkpoint)``; ``checkpoint.restore(state)``
    restores every stateful one.
    """
    from kits_keras.model.unet import build_unet

    summary = cb.ValidationSummary(config.train.metric_smoothing,
                                   volume_validator,
                                   config.train.volume_validation_every)
    plateau = cb.ResumableReduceLROnPlateau(
        monitor="loss", factor=config.train.lr_factor,
        patience=config.train.lr_patience, verbose=1,
    )
    csv_path = os.path.join(run_dir, "history.csv")
    loggers = [keras.callbacks.CSVLogger(csv_path, append=True)]
    # keras' TensorBoard logger writes through tf.summary, which needs both
    # TensorFlow and the tensorboard package; without them only CSV.
    if all(importlib.util.find_spec(m) for m in ("tensorflow", "tensorboard")):
        backend_lib.import_tensorflow()
        loggers.append(keras.callbacks.TensorBoard(
            os.path.join(run_dir, "logs"), write_graph=False,
            profile_batch=0))
    curves = cb.LossCurves(csv_path, os.path.join(run_dir, "loss_curves.png"))
    export = []

    def save_best(model, epoch, logs):
        # An uncompiled twin keeps the optimizer state out of the artifact.
        if not export:
            export.append(build_unet(config))
        export[0].set_weights(model.get_weights())
        extra = {k: float(v) for k, v in logs.items() if k.startswith("val")}
        artifact.save_artifact(
            export[0], config, stats,
            os.path.join(run_dir, artifact.MODEL_FILE),
            extra={"epoch": epoch + 1, **extra},
        )

    checkpoint = cb.RunCheckpoint(
        os.path.join(run_dir, "checkpoints"), save_best,
        {"plateau": plateau, "summary": summary},
        {"seed": int(seed), "config": config.name},
    )
    return [summary, plateau, *loggers, curves, checkpoint], checkpoint


def train(config, model, epoch_dataset, validation, run_dir, stats=None,
          seed=0, state=None, verbose="auto", volume_validator=None,
          time_budget_s=None):
    """Trains a compiled ``model`` into ``run_dir``; the core of :func:`fit`.

    Args:
        config: ExperimentConfig. ``train`` gives epochs and steps.
        model: compiled keras.Model (see :func:`compile_model`).
        epoch_dataset: callable ``epoch -> tf.data.Dataset`` of
            ``(image (B, z, y, x, 1), labels tuple)`` batches; must depend on
            the epoch only (exact resume).
        validation: finite dataset of the same structure, or None (then
            ``model.keras`` is rewritten after every epoch).
        run_dir: str. Created if needed.
        stats: IntensityStats (or dict) stored in the artifact.
        seed: int. Recorded in ``state.json``.
        state: dict from ``checkpoints/state.json`` to resume from, or None.
        verbose: Keras verbosity ("auto": a progress bar per epoch).
        volume_validator: :class:`kits_keras.training.validation.VolumeValidator`
            or None: full-volume validation on the first epoch, every
            ``config.train.volume_validation_every`` epochs and the last,
            which then decides the best checkpoint.
        time_budget_s: float or None. Stop after the first epoch that ends
            past this many seconds of training.

    Returns:
        keras.callbacks.History of this call.
    """
    os.makedirs(run_dir, exist_ok=True)
    callbacks, checkpoint = make_callbacks(
        run_dir, config, stats, seed, volume_validator)
    if time_budget_s:
        # Before the checkpoint callback, so the last epoch is still saved.
        callbacks.insert(-1, cb.TimeBudget(time_budget_s))
    if validation is None:  # no best epoch to pick: keep the last one
        callbacks.insert(-1, keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: checkpoint.save_best(
                checkpoint.model, epoch, logs or {})))
    initial_epoch = 0
    if state is not None:
        initial_epoch = restore(model, run_dir, state, checkpoint)
    cb.truncate_history(os.path.join(run_dir, "history.csv"), initial_epoch)
    # The validation set is finite with unknown length: Keras finds its end
    # by running out and warns as if the training stream had.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of")
        return _fit_epochs(model, epoch_dataset, validation, config,
                           initial_epoch, callbacks, verbose)


def _fit_epochs(model, epoch_dataset, validation, config, initial_epoch,
                callbacks, verbose):
    steps = config.train.steps_per_epoch
    return model.fit(
        epoch_batches(epoch_dataset, initial_epoch, config.train.epochs,
                      steps),
        epochs=config.train.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps,
        validation_data=validation,
        validation_freq=config.train.validation_every,
        shuffle=False,  # the stream is shuffled and seeded per epoch
        callbacks=callbacks,
        verbose=verbose,
    )


def restore(model, run_dir, state, checkpoint):
    """Loads weights, optimizer and callback states; returns epochs done.

    Temporary files a killed run left in the run and checkpoint folders
    are removed first (:func:`kits_keras.files.sweep_temporaries`).
    """
    from kits_keras import files

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


def _check_checkpoint(run_dir, state):
    """Refuses a missing or damaged checkpoint before anything is written
    (the weights are only loaded once the dataset and model are built)."""
    import zipfile

    from kits_keras import files

    path = cb.checkpoint_path(os.path.join(run_dir, "checkpoints"), state)
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        damaged = files.first_line(err)
    if damaged:
        raise files.CaseError(
            f"{path}: cannot load this checkpoint (damaged: {damaged})")


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
        with open(os.path.join(run_dir, "config.json")) as f:
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


def fit(config, data_dir, out_dir=None, gpus=1, resume=False, changes=None,
        cluster=None, verbose="auto", time_budget_s=None):
    """Trains on a prepared dataset; the library side of ``kits-keras fit``.

    Args:
        config: ExperimentConfig, or None to resume with the run's own.
        data_dir: str. TFDS data folder (``kits-keras prepare``).
        out_dir: str or None. Run folder; default a new dated folder under
            :func:`kits_keras.artifact.default_runs_root` (resume: the
            latest run there).
        gpus: int. Devices per process for data parallelism.
        resume: bool. Continue the run in ``out_dir`` from its checkpoint.
        changes: dict or None. Command-line changes,
            ``{section: {field: value}}`` with None for "not given",
            applied to ``config`` (or the resumed run's) by
            :func:`prepare_run`; on ``resume`` only ``train.epochs`` may
            differ from the run's.
        cluster: Cluster or None. Multi-host training.
        verbose: Keras verbosity.
        time_budget_s: float or None. Training time budget in seconds.

    Returns:
        str. The run folder.
    """
    if cluster is not None and not out_dir:
        raise ValueError(
            "Several processes need --out: one run folder that every "
            "process reaches (process 0 writes it; --resume reads it).")
    run_dir, config, state = prepare_run(config, out_dir, resume, changes)
    seed = config.train.seed
    distribution = setup_distribution(gpus, cluster, config.train.batch_size)
    shard = None
    if cluster is not None:  # each process reads its rows of every batch
        shard = (cluster.process_id, cluster.num_processes)
        n = config.train.batch_size // cluster.num_processes
        log.info("Process %d of %d reads patches %d..%d of every batch of %d",
                 cluster.process_id, cluster.num_processes,
                 cluster.process_id * n, (cluster.process_id + 1) * n - 1,
                 config.train.batch_size)
    # Before anything is written: a missing dataset leaves no empty run.
    epoch_dataset, validation = build_dataset(
        config, data_dir, seed, distribution is not None, shard=shard)
    policy = set_precision()  # before the model is built
    log.info("Run folder: %s; precision %s", run_dir, policy)
    writes = cluster is None or cluster.writes
    if writes:
        os.makedirs(run_dir, exist_ok=True)
        files.write_json(os.path.join(run_dir, "config.json"),
                         config.to_dict())
    model = compile_model(build_model(config, seed), config)
    if distribution is not None:
        shape = (config.train.batch_size // (cluster.num_processes if cluster
                                             else 1),
                 *config.data.patch_size, 1)
        log.info("Batch %s sharded as %s", shape,
                 describe_sharding(distribution, shape))
    validator = None
    # One process on one device: with several processes every one would run
    # the whole sliding window (minutes per epoch), and a data-parallel
    # model wants batches that split evenly over its devices; those runs
    # keep choosing by the patch Dice.
    if (validation is not None and distribution is None
            and config.train.volume_validation_every > 0):
        from kits_keras.training import validation as validation_lib

        volumes = validation_lib.load_validation_volumes(config, data_dir)
        if volumes:
            validator = validation_lib.VolumeValidator(volumes, config)
    with _process_folder(run_dir, state, writes) as folder, \
            _peers_watched(cluster):
        train(config, model, epoch_dataset, validation, folder,
              stats=intensity_stats(config, data_dir), seed=seed,
              state=state, verbose=verbose, time_budget_s=time_budget_s,
              volume_validator=validator)
    if distribution is not None:
        devices = model.trainable_weights[0].value.sharding.device_set
        log.info("Weights replicated on %s", sorted(map(str, devices)))
    if cluster is not None:
        log.info("Process %d of %d: final weights digest %s",
                 cluster.process_id, cluster.num_processes,
                 weights_digest(model))
    return run_dir


@contextlib.contextmanager
def _peers_watched(cluster):
    """Turns a failed collective (a peer that died: gloo or NCCL reports
    the closed connection at the next all-reduce) into a ClusterError."""
    if cluster is None:
        yield
        return
    import jax

    try:
        yield
    except jax.errors.JaxRuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ClusterError(
            f"process {cluster.process_id} of {cluster.num_processes}: "
            f"training stopped because another process stopped answering "
            f"({first[:300]}). Every process has stopped; start them all "
            "again with --resume.") from None


@contextlib.contextmanager
def _process_folder(run_dir, state, writes):
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
