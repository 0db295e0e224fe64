"""Training the multi-scale supervised U-Net: ``kits-keras fit``.

Small functions, one job each: :func:`build_dataset`, :func:`build_model`,
:func:`compile_model`, :func:`make_callbacks`, :func:`train` (the loop on any
data) and :func:`fit` (everything from a prepared dataset folder). The run
folder (start, resume, checkpoints) is
:mod:`kits_keras.training.run_folder`; data parallelism over devices and
hosts is :mod:`kits_keras.training.distribute`.

Schedule (paper): Adam 3e-4, x0.2 when the training loss has not improved for
``lr_patience`` epochs, ``steps_per_epoch`` iterations per epoch; or
nnU-Net's polynomial decay (``train.lr_schedule="poly"``). Epoch ``e``
draws its patches from a data stream seeded by ``(seed, e)`` alone, so a
resumed run sees the same batches as an uninterrupted one.

Keras must be imported after the backend is chosen
(:func:`kits_keras.backend.select_backend`); the CLI imports this module
lazily for that reason. Nothing here imports TensorFlow except through the
data pipeline and the optional TensorBoard logger.
"""

import importlib.util
import logging
import os
import warnings

import keras
import numpy as np

from kits_keras import artifact
from kits_keras import backend as backend_lib
from kits_keras.training import averaging
from kits_keras.training import callbacks as cb
from kits_keras.training import distribute
from kits_keras.training import run_folder

log = logging.getLogger(__name__)


def epoch_seed(seed, epoch):
    """The data seed of epoch ``epoch``: depends on ``(seed, epoch)`` only."""
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)
    return int(state[0] % (2**31 - 1))



def set_precision():
    """mixed_bfloat16 when JAX has a GPU/TPU, float32 otherwise."""
    use_bf16 = (keras.backend.backend() == "jax"
                and backend_lib.has_accelerator())
    policy = "mixed_bfloat16" if use_bf16 else "float32"
    keras.config.set_dtype_policy(policy)
    return policy


# Validation patches up to this size are kept in memory (tiny: ~5 MB per
# validation case; paper: ~60 MB per case, 0.6 GB for its 10, read from
# the dataset every epoch instead).
MAX_IN_MEMORY_VALIDATION_BYTES = 256 * 2**20


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
        training ``tf.data.Dataset`` of that epoch; ``validation`` is finite
        (in memory when under ``MAX_IN_MEMORY_VALIDATION_BYTES``), or None
        when the dataset has too few cases to hold any out.
    """
    from kits_keras.data import pipeline as data

    patch_fn = data.traced_patch_fn(config)  # one trace for every epoch

    def epoch_dataset(epoch):
        return data.make_train_dataset(config, data_dir,
                                       seed=epoch_seed(seed, epoch),
                                       shard=shard, patch_fn=patch_fn)

    validation = data.make_validation_dataset(config, data_dir)
    if full_batches and validation is not None:
        validation = validation.unbatch().batch(
            config.train.batch_size, drop_remainder=True)
        if shard is not None:  # un-augmented and few: cut, then shared out
            n = config.train.batch_size // shard[1]
            rows = slice(shard[0] * n, (shard[0] + 1) * n)
            validation = validation.map(
                lambda x, ys: (x[rows], tuple(y[rows] for y in ys)))
    if (validation is not None and data.validation_bytes(config)
            <= MAX_IN_MEMORY_VALIDATION_BYTES):
        validation = data.in_memory(validation)
    return epoch_dataset, validation


def epoch_batches(epoch_dataset, initial_epoch, epochs, steps):
    """Yields ``steps`` numpy batches of each epoch from ``initial_epoch``."""
    for epoch in range(initial_epoch, epochs):
        ds = epoch_dataset(epoch).repeat().take(steps)
        yield from ds.as_numpy_iterator()


def intensity_stats(config, data_dir):
    """The training set's IntensityStats dict from the TFDS metadata."""
    from kits_keras.data.prepared import prepared_builder

    builder = prepared_builder(config, data_dir)
    return (builder.info.metadata or {}).get("intensity_stats")


def build_model(config, seed):
    """The U-Net of ``config`` with weights initialised from ``seed``."""
    from kits_keras.model.unet import build_unet

    keras.utils.set_random_seed(int(seed))
    return build_unet(config)


def compile_model(model, config):
    """The optimizer, the multi-scale loss, region Dice on the full-res
    output.

    With ``train.ema_momentum`` > 0 the optimizer also keeps a moving
    average of the weights (:mod:`kits_keras.training.averaging`).

    The loss is the exp-log loss (``model.output_mode="softmax"``) or Dice
    + BCE per region ("regions"); the loss of output ``i`` is weighted by
    ``deep_supervision_weights`` (halving per level, normalised).
    """
    from kits_keras.model.losses import deep_supervision_weights
    from kits_keras.model.metrics import RegionDice
    from kits_keras.model.metrics import region_names

    n = len(model.outputs)
    label_set = config.data.label_set
    mode = config.model.output_mode
    metrics = [RegionDice(r, label_set, mode) for r in region_names(label_set)]
    model.compile(
        optimizer=make_optimizer(config.train),
        loss=[make_loss(config) for _ in range(n)],
        loss_weights=deep_supervision_weights(n),
        metrics=[metrics] + [[] for _ in range(n - 1)],
    )
    return model


def make_optimizer(train):
    """The optimizer of ``train`` (a :class:`TrainConfig`).

    >>> from kits_keras.config import TrainConfig
    >>> sgd = make_optimizer(TrainConfig(optimizer="sgd", clip_norm=12.0))
    >>> type(sgd).__name__, sgd.nesterov, sgd.global_clipnorm
    ('SGD', True, 12.0)
    """
    ema = train.ema_momentum
    common = dict(
        learning_rate=train.learning_rate, use_ema=ema > 0, ema_momentum=ema,
        weight_decay=train.weight_decay or None,
        global_clipnorm=train.clip_norm or None)
    if train.optimizer == "sgd":
        return keras.optimizers.SGD(
            momentum=train.momentum, nesterov=True, **common)
    return keras.optimizers.Adam(**common)


def make_loss(config):
    """The Keras loss of one output for ``config.model.output_mode``."""
    from kits_keras.model.losses import ExpLogLoss
    from kits_keras.model.losses import RegionLoss

    if config.model.output_mode == "regions":
        return RegionLoss.from_loss_config(
            config.loss, label_set=config.data.label_set)
    return ExpLogLoss.from_loss_config(config.loss)


def make_schedule(train):
    """The learning-rate callback of ``train.lr_schedule``."""
    if train.lr_schedule == "poly":
        return cb.PolyLearningRate(train.learning_rate, train.epochs)
    return cb.ResumableReduceLROnPlateau(
        monitor="loss", factor=train.lr_factor, patience=train.lr_patience,
        verbose=1)


def make_callbacks(run_dir, config, stats, seed, volume_validator=None):
    """The callbacks of a run, in the order they must run.

    ``volume_validator`` (or None) runs every
    ``config.train.volume_validation_every`` epochs.

    Returns ``(callbacks, checkpoint)``; ``checkpoint.restore(state)``
    restores every stateful one.
    """
    from kits_keras.model.unet import build_unet

    from kits_keras.model.metrics import region_names

    summary = cb.ValidationSummary(config.train.metric_smoothing,
                                   volume_validator,
                                   config.train.volume_validation_every,
                                   region_names(config.data.label_set))
    schedule = make_schedule(config.train)
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
        export[0].set_weights(averaging.averaged_weights(model))
        extra = {k: float(v) for k, v in logs.items() if k.startswith("val")}
        artifact.save_artifact(
            export[0], config, stats,
            os.path.join(run_dir, artifact.MODEL_FILE),
            extra={"epoch": epoch + 1, **extra},
        )

    checkpoint = cb.RunCheckpoint(
        os.path.join(run_dir, "checkpoints"), save_best,
        # The plateau rule has counters to save; poly is a function of the
        # epoch alone.
        {"summary": summary, **({"plateau": schedule} if hasattr(
            schedule, "get_state") else {})},
        {"seed": int(seed), "config": config.name},
    )
    eta = cb.Eta(config.train.epochs, config.train.steps_per_epoch)
    return ([averaging.ValidateAveraged(), summary, schedule, *loggers,
             curves, eta, checkpoint], checkpoint)


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
        initial_epoch = run_folder.restore(model, run_dir, state,
                                           checkpoint)
    cb.truncate_history(os.path.join(run_dir, "history.csv"), initial_epoch)
    # A validation set streamed from the dataset (over
    # MAX_IN_MEMORY_VALIDATION_BYTES) is finite with unknown length: Keras
    # finds its end by running out and warns as if the training stream had.
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Your input ran out of")
            return _fit_epochs(model, epoch_dataset, validation, config,
                               initial_epoch, callbacks, verbose)
    except BaseException:
        # Keras ends no callback after an error (Ctrl-C, a lost peer): the
        # curves would miss up to 4 checkpointed epochs.
        for callback in callbacks:
            if isinstance(callback, cb.LossCurves):
                callback.draw(quiet=True)
        raise


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
            :func:`kits_keras.training.run_folder.prepare_run`; on
            ``resume`` only ``train.epochs`` may differ from the run's.
        cluster: :class:`kits_keras.training.distribute.Cluster` or None.
            Multi-host training.
        verbose: Keras verbosity.
        time_budget_s: float or None. Training time budget in seconds.

    Returns:
        str. The run folder.
    """
    if cluster is not None and not out_dir:
        raise ValueError(
            "Several processes need --out: one run folder that every "
            "process reaches (process 0 writes it; --resume reads it).")
    run_dir, config, state = run_folder.prepare_run(config, out_dir, resume,
                                                    changes)
    distribution = distribute.setup_distribution(gpus, cluster,
                                                 config.train.batch_size)
    # Before anything is written: a missing dataset leaves no empty run.
    epoch_dataset, validation = build_dataset(
        config, data_dir, config.train.seed, distribution is not None,
        shard=_shard(config, cluster))
    policy = set_precision()  # before the model is built
    log.info("Run folder: %s; precision %s", run_dir, policy)
    writes = cluster is None or cluster.writes
    if writes:
        run_folder.write_config(run_dir, config)
        run_folder.write_runtime(run_dir)
    model = compile_model(build_model(config, config.train.seed), config)
    if distribution is not None:
        distribute.log_sharding(config, distribution, cluster)
    validator = _volume_validator(config, data_dir, validation, distribution)
    with run_folder.process_folder(run_dir, state, writes) as folder, \
            distribute.peers_watched(cluster):
        train(config, model, epoch_dataset, validation, folder,
              stats=intensity_stats(config, data_dir),
              seed=config.train.seed, state=state, verbose=verbose,
              time_budget_s=time_budget_s, volume_validator=validator)
    distribute.log_final_weights(model, distribution, cluster)
    return run_dir


def _shard(config, cluster):
    """``(process_id, num_processes)``: each process of ``cluster`` reads
    its rows of every batch; None for a single process."""
    if cluster is None:
        return None
    n = config.train.batch_size // cluster.num_processes
    log.info("Process %d of %d reads patches %d..%d of every batch of %d",
             cluster.process_id, cluster.num_processes,
             cluster.process_id * n, (cluster.process_id + 1) * n - 1,
             config.train.batch_size)
    return cluster.process_id, cluster.num_processes


def _volume_validator(config, data_dir, validation, distribution):
    """The whole-volume validator of a run, or None.

    One process on one device only: with several processes every one
    would run the whole sliding window (minutes per epoch), and a
    data-parallel model wants batches that split evenly over its devices;
    those runs keep choosing by the patch Dice.
    """
    if (validation is None or distribution is not None
            or config.train.volume_validation_every <= 0):
        return None
    from kits_keras.training import validation as validation_lib

    volumes = validation_lib.load_validation_volumes(config, data_dir)
    if not volumes:
        return None
    return validation_lib.VolumeValidator(volumes, config)
