"""Data-parallel and multi-host training: the device mesh and the cluster.

:func:`setup_distribution` spreads each global batch over ``gpus`` devices
of every process (``keras.distribution.DataParallel``); a :class:`Cluster`
joins several processes (hosts) through JAX's distributed runtime, and
:func:`peers_watched` turns a lost process into a :class:`ClusterError`.
``docs/multihost.md`` says how to launch one.

Keras must be imported after the backend is chosen
(:func:`kits_keras.backend.select_backend`); JAX is imported when used.
"""

import contextlib
import dataclasses
import logging

import keras
import numpy as np

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


@contextlib.contextmanager
def peers_watched(cluster):
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


def log_sharding(config, distribution, cluster):
    """Logs how this process's batch is placed on its devices."""
    shape = (config.train.batch_size // (cluster.num_processes if cluster
                                         else 1),
             *config.data.patch_size, 1)
    log.info("Batch %s sharded as %s", shape,
             describe_sharding(distribution, shape))


def log_final_weights(model, distribution, cluster):
    """Logs where the trained weights live and, for a cluster, their
    digest (equal on every process)."""
    if distribution is not None:
        devices = model.trainable_weights[0].value.sharding.device_set
        log.info("Weights replicated on %s", sorted(map(str, devices)))
    if cluster is not None:
        log.info("Process %d of %d: final weights digest %s",
                 cluster.process_id, cluster.num_processes,
                 weights_digest(model))
