"""``kits-keras fit``: train the U-Net on a prepared dataset."""

import logging
import os
import sys

import click

from cli.common import backend_option
from cli.common import user_errors

log = logging.getLogger(__name__)


@click.command()
@click.option("--data-dir", required=True, type=click.Path(),
              help="TFDS data folder written by `kits-keras prepare`.")
@click.option("--config", "config_name", default=None,
              help="Experiment: paper, coarse or tiny (required unless "
                   "--resume, which reuses the run's config).")
@click.option("--gpus", type=int, default=1, show_default=True,
              help="Devices to train on, data parallel (per process).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs [default: the config's].")
@click.option("--steps-per-epoch", type=click.IntRange(min=1), default=None,
              help="Iterations per epoch [default: the config's].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Global batch, split over devices [default: config's].")
@click.option("--patch-size", nargs=3, type=click.IntRange(min=1),
              default=None, metavar="Z Y X",
              help="Training patch in voxels (slices first) [default: the "
                   "config's]; multiples of the network's total stride.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              default=None,
              help="Run folder [default: a new dated folder under "
                   "$KITS_KERAS_RUNS or ./runs].")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out (default: the latest run) "
                   "from its last checkpoint.")
@backend_option(" --gpus > 1 always uses JAX.")
@click.option("--seed", type=int, default=None,
              help="Seed for weights and data [default: the config's].")
@click.option("--coordinator-address", default=None,
              help="Multi-host: host:port of process 0.")
@click.option("--num-processes", type=click.IntRange(min=1), default=None,
              help="Multi-host: number of processes.")
@click.option("--process-id", type=click.IntRange(min=0), default=None,
              help="Multi-host: this process's index (0 writes the run "
                   "folder).")
@click.option("--heartbeat-timeout", "heartbeat_s", type=click.IntRange(
              min=1), default=60, show_default=True,
              help="Multi-host: seconds without news from a process before "
                   "the others stop with an error.")
@user_errors
def fit(data_dir, config_name, gpus, epochs, steps_per_epoch, batch_size,
        patch_size, out_dir, resume, backend, seed, coordinator_address,
        num_processes, process_id, heartbeat_s):
    """Trains the multi-scale supervised 3D U-Net.

    Writes the run folder: model.keras (best model, with its config and
    intensity statistics), checkpoints/, history.csv, loss_curves.png.
    """
    from kits_keras import backend as backend_lib
    from kits_keras import config as config_lib

    multi = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in multi) and None in multi:
        raise click.UsageError(
            "--coordinator-address, --num-processes and --process-id go "
            "together.")
    if coordinator_address is not None:
        # No probing for an accelerator here: JAX's distributed runtime must
        # start before anything initialises a JAX backend.
        if backend not in ("auto", "jax"):
            raise click.UsageError(
                "--coordinator-address (several processes) needs --backend "
                "jax or auto.")
        name = "jax"
    else:
        name = backend_lib.resolve_backend(backend)
    if gpus > 1 and name != "jax":
        if backend != "auto":
            raise click.UsageError(
                f"--gpus {gpus} (data parallel) needs --backend jax or auto.")
        log.info("Data-parallel training runs on JAX: using the JAX backend.")
        name = "jax"
    backend_lib.select_backend(name)

    if config_name is None and not resume:
        raise click.UsageError("--config is required (unless --resume).")
    config = (None if config_name is None
              else config_lib.get_config(config_name))
    # Flags not given are None: training.fit applies the rest (to the
    # named config, or to the resumed run's) with config.override.
    changes = {"train": {"epochs": epochs,
                         "steps_per_epoch": steps_per_epoch,
                         "batch_size": batch_size, "seed": seed},
               "data": {"patch_size": patch_size or None}}
    from kits_keras.training import distribute
    from kits_keras.training import fit as training

    cluster = None
    if coordinator_address is not None:
        cluster = distribute.Cluster(coordinator_address, num_processes,
                                     process_id, heartbeat_s)
    try:
        run_dir = training.fit(config, data_dir, out_dir=out_dir, gpus=gpus,
                               resume=resume, changes=changes,
                               cluster=cluster)
    except distribute.ClusterError as err:
        click.echo(f"Error: {err}", err=True)
        # Now: JAX's distributed shutdown at exit would wait for the lost
        # process until the heartbeat timeout, then abort with a trace.
        sys.stderr.flush()
        os._exit(1)
    click.echo(f"Run folder: {run_dir}")
