"""SavedModel export for TensorFlow Serving, and running an export locally.

:func:`export_saved_model` writes ``OUT_DIR/<version>/`` in the layout TF
Serving loads (``saved_model.pb``, ``variables/``, ``assets/``) through Keras
3's :class:`keras.export.ExportArchive`. On the JAX backend the forward pass is
lowered to StableHLO with ``jax2tf`` (native serialization, for both the CPU
and the CUDA platform, so one export serves on either).

The ``serving_default`` signature takes ``image``: float32
``(batch, z, y, x, 1)`` (normalised, resampled CT, as
:func:`kits_keras.data.preprocessing.preprocess_image` makes it) and returns
``probabilities``: float32 ``(batch, z, y, x, C)``, the full-resolution
softmax. Batch and spatial size are dynamic (``jax2tf`` shape polymorphism);
each spatial size must be a multiple of the network's total stride
(:func:`kits_keras.model.unet.total_stride`, ``signature.spatial_multiple`` in
the asset), which the signature checks. ``fixed_size=True``
pins the spatial size to the training patch instead.

Everything a client needs to prepare the input and tile a volume travels in
``assets/kits_keras.json``: intensity statistics, target spacing (z, y, x) in
mm, patch size, class names and label values, and the whole experiment config.
:func:`load_saved_model` reads it back, so the NumPy predictor
(:func:`kits_keras.inference.predict.predict_case`) runs unchanged on the exported model.
"""

import dataclasses
import datetime
import logging
import os
import re
import shutil
import tempfile
import time

import numpy as np

from kits_keras import config as config_lib
from kits_keras import files
from kits_keras import io

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
SIGNATURE = "serving_default"
# The unchecked forward pass, registered first; ``serving_default`` wraps it.
RAW_ENDPOINT = "serve"
ASSET_NAME = "kits_keras.json"
FORMAT = "kits_keras.saved_model"
FORMAT_VERSION = 1
# Lowered for both so that one export serves on CPU and GPU TF Serving.
PLATFORMS = ("cpu", "cuda")


def input_shape(config, fixed_size=False):
    """Signature shape ``(batch, z, y, x, 1)``; ``None`` marks dynamic axes."""
    if fixed_size:
        return (None, *config.data.patch_size, 1)
    return (None, None, None, None, 1)


def polymorphic_shape(config, fixed_size=False):
    """``jax2tf`` shape spec, e.g. ``"(batch, 8*z, 16*y, 16*x, 1)"``.

    Writing each spatial axis as a multiple of a dimension variable lets
    ``jax2tf`` prove that every strided convolution halves it exactly and
    every transposed convolution restores it, so one lowering serves all
    valid sizes.
    """
    from kits_keras.model.unet import total_stride

    if fixed_size:
        dims = [str(s) for s in config.data.patch_size]
    else:
        dims = [
            name if m == 1 else f"{m}*{name}"
            for m, name in zip(total_stride(config), ("z", "y", "x"))
        ]
    return f"(batch, {', '.join(dims)}, 1)"


def metadata(config, stats, source="", fixed_size=False,
             orientation=io.KITS19_ORIENTATION):
    """The asset dict: what a client needs besides the signature.

    ``orientation`` (nibabel axis codes) is the voxel orientation the
    network was trained in, stored as in a ``.keras`` archive
    (:func:`kits_keras.artifact.orientation_of` reads either).
    """
    import kits_keras
    from kits_keras.artifact import ORIENTATION_KEY
    from kits_keras.model.unet import total_stride

    stats_dict = stats.to_dict() if hasattr(stats, "to_dict") else dict(stats)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kits_keras_version": kits_keras.__version__,
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "source": os.fspath(source),
        "signature": {
            "name": SIGNATURE,
            "input": INPUT_NAME,
            "input_shape": list(input_shape(config, fixed_size)),
            "input_dtype": "float32",
            "output": OUTPUT_NAME,
            "output_shape": [None, None, None, None, config.model.num_classes],
            "output_dtype": "float32",
            "spatial_multiple": list(total_stride(config)),
            "fixed_size": bool(fixed_size),
        },
        "intensity_stats": stats_dict,
        "target_spacing": list(config.data.target_spacing),
        "patch_size": list(config.data.patch_size),
        "class_names": list(io.CLASS_NAMES),
        "label_values": list(io.LABEL_VALUES),
        ORIENTATION_KEY: "".join(io.check_orientation(orientation)),
        "config": config.to_dict(),
    }


def export_saved_model(model, out_dir, version=1, config=None, stats=None,
                       fixed_size=False, orientation=io.KITS19_ORIENTATION):
    """Exports a trained model as ``out_dir/<version>/`` for TF Serving.

    The export is written to a hidden temporary folder inside ``out_dir`` and
    renamed to ``<version>`` only when complete, so a failure leaves no
    partial version behind (TF Serving ignores non-numeric folders).

    Args:
        model: str | keras.Model. A training run directory or model artifact
            (``RUN/model.keras``, read with
            :func:`kits_keras.artifact.load_artifact`), or a built model; a
            multi-output (deep supervision) model is reduced to its
            full-resolution output.
        out_dir: str. The model base path TF Serving watches.
        version: int. Version folder name (positive). Defaults to 1.
        config: ExperimentConfig. Required when ``model`` is a keras.Model.
        stats: IntensityStats (or its dict). Required with a keras.Model.
        fixed_size: bool. Pin the spatial input size to
            ``config.data.patch_size`` instead of any multiple of the total
            stride. Defaults to False.
        orientation: axis codes the network was trained in, for a
            keras.Model (an artifact's own is used otherwise). Defaults to
            KiTS19's.

    Returns:
        str. The version folder written.

    Raises:
        ValueError: bad version, existing version folder, or missing config.
    """
    if isinstance(version, bool) or not isinstance(version, int) or (
        version < 1
    ):
        raise ValueError(
            f"version must be a positive integer. Received: version={version!r}"
        )
    out_dir = os.path.abspath(os.fspath(out_dir))
    target = os.path.join(out_dir, str(version))
    if os.path.exists(target):
        raise ValueError(
            f"{target}: version {version} already exists; choose another "
            "--version (existing exports are never overwritten)."
        )
    source = ""
    if isinstance(model, (str, os.PathLike)):
        from kits_keras.artifact import load_artifact

        artifact = load_artifact(model)
        model, config, stats = artifact.model, artifact.config, artifact.stats
        source, orientation = artifact.path, artifact.orientation
        if stats is None:
            raise ValueError(
                f"{source}: holds no intensity statistics (trained on "
                "in-memory data?); a served model needs them to normalise CT"
            )
    if config is None or stats is None:
        raise ValueError(
            "config and stats are required when exporting a keras.Model. "
            f"Received: config={config!r}, stats={stats!r}"
        )
    model = _full_resolution(model)

    start = time.perf_counter()
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=out_dir)
    try:
        # mkdtemp makes it private (0700); a TF Serving container running
        # as another user must be able to read the version folder.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        _write_saved_model(model, tmp, config, fixed_size)
        _write_metadata(tmp, metadata(config, stats, source, fixed_size,
                                      orientation))
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise
    log.info(
        "Exported %s in %.1f s (%.1f MB).", target,
        time.perf_counter() - start, folder_size(target) / 1e6,
    )
    return target


def _full_resolution(model):
    if len(model.outputs) == 1:
        return model
    from kits_keras.model.unet import full_resolution_model

    return full_resolution_model(model)


def _write_saved_model(model, path, config, fixed_size):
    """Traces the forward pass into a SavedModel at ``path``."""
    tf = _tensorflow()
    import keras

    from kits_keras.model.unet import total_stride

    spec = tf.TensorSpec(
        input_shape(config, fixed_size), tf.float32, name=INPUT_NAME
    )

    def probabilities(image):
        # training=False: inference statistics if the model has BatchNorm.
        return keras.ops.cast(model(image, training=False), "float32")

    kwargs = {}
    if keras.backend.backend() == "jax":
        kwargs["jax2tf_kwargs"] = {
            "polymorphic_shapes": [polymorphic_shape(config, fixed_size)],
            "native_serialization_platforms": PLATFORMS,
            # Serving never differentiates; skip the gradient function.
            "with_gradient": False,
        }
    archive = keras.export.ExportArchive()
    archive.track(model)
    raw = archive.add_endpoint(RAW_ENDPOINT, probabilities, [spec], **kwargs)
    stride = total_stride(config)
    multiple = tf.constant(stride, tf.int32)

    @tf.function(input_signature=[spec], autograph=False)
    def serving_default(image):
        # A clear message instead of XLA's shape-refinement error.
        check = tf.debugging.assert_equal(
            tf.math.floormod(tf.shape(image)[1:4], multiple), 0,
            message=(
                f"{INPUT_NAME}: spatial size (z, y, x) must be a multiple of "
                f"{stride}; pad the patch"
            ),
        )
        with tf.control_dependencies([check]):
            image = tf.identity(image)
        return {OUTPUT_NAME: raw(image)}

    serving_default.get_concrete_function()
    archive.add_endpoint(SIGNATURE, serving_default)
    archive.write_out(path, verbose=False)


def _write_metadata(path, meta):
    files.write_json(os.path.join(path, "assets", ASSET_NAME), meta)


def _tensorflow():
    from kits_keras.backend import import_tensorflow

    return import_tensorflow()


def folder_size(path):
    """Bytes in all files under ``path``."""
    total = 0
    for root, _, names in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in names)
    return total


def is_export(path):
    """Whether :func:`resolve_version_dir` finds a SavedModel in ``path``
    (a version folder, or a model base path with numeric versions)."""
    try:
        resolve_version_dir(path)
    except FileNotFoundError:
        return False
    return True


def resolve_version_dir(path):
    """The SavedModel folder for ``path``.

    ``path`` is either a version folder (holding ``saved_model.pb``) or a
    model base path, in which case the highest numeric version is used, as
    TF Serving does.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such SavedModel folder")
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    versions = [
        int(name) for name in os.listdir(path)
        if name.isdigit()
        and os.path.exists(os.path.join(path, name, "saved_model.pb"))
    ]
    if not versions:
        raise FileNotFoundError(
            f"{path}: neither a SavedModel (no saved_model.pb) nor a model "
            "base path with numeric version folders"
        )
    return os.path.join(path, str(max(versions)))


def check_format(meta, path):
    """Refuses an asset dict of another format, or of a newer version.

    Raises:
        CaseError: naming ``path``.
    """
    if meta.get("format") != FORMAT:
        raise io.CaseError(
            f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}"
        )
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise io.CaseError(
            f"{path}: format_version {meta['format_version']} is newer than "
            f"this kits-keras reads ({FORMAT_VERSION}); upgrade kits-keras"
        )


# --- Refusing exports that do more than compute. -------------------------
#
# A SavedModel is a TensorFlow program: its functions run when it is loaded
# (resource initialisers) and called, and may read or write files like any
# code. Before loading, every node of every MetaGraph (the graph and every
# function of its library) is checked:
#
# * Ops whose name says file-system, process, Python or network access
#   (_IO_OP: ReadFile, WriteFile, MatchingFiles, PyFunc/EagerPyFunc,
#   Print/PrintV2, DecodeProto/EncodeProto (descriptor files), queues and
#   readers, datasets (CacheDataset and SnapshotDataset write files),
#   Debug* (debug_urls), summaries, lookup tables (text-file initialisers),
#   Send/Recv, collectives, TPU and infeed ops, ImmutableConst (maps a
#   file)) are refused everywhere, except the variable-checkpoint ops
#   (_SAVER_OPS: SaveV2, RestoreV2, ...) in the saver functions.
# * Any other op TensorFlow marks stateful (side effects) is refused unless
#   the serving path needs it (_STATEFUL_OK: variables, function calls,
#   Assert, XlaCallModule), and an op TensorFlow does not know (a custom
#   kernel) is refused.
#
# The saver functions are the ones reached from the nodes `saver_def` names
# (save and restore, called with a checkpoint prefix) and from nothing
# else; TensorFlow 2 restores variables with its own Python-built ops and
# never calls them. A saver function that serving_default could also reach
# is not a saver function and is refused like any other.
_IO_OP = re.compile(
    r"File|Reader|Queue|Dataset|Iterator|PyFunc|Proto|Summary|Print|Debug|"
    r"Save|Restore|Checkpoint|Record|Table|Collective|TPU|Tpu|Infeed|Outfeed|"
    r"^Send|^Recv|^_Send|^_Recv|ImmutableConst|Sleep|Snapshot|Rpc")
_SAVER_OPS = frozenset({
    "SaveV2", "RestoreV2", "MergeV2Checkpoints", "ShardedFilename",
    "DisableCopyOnRead", "AssignVariableOp",
})
_STATEFUL_OK = frozenset({
    "VarHandleOp", "ReadVariableOp", "VarIsInitializedOp", "AssignVariableOp",
    "StatefulPartitionedCall", "Assert", "XlaCallModule",
})


def _called_functions(node, library):
    """Names of the library functions a NodeDef calls (by op or attr)."""
    called = {node.op} & library.keys()
    for attr in node.attr.values():
        if attr.HasField("func"):
            called.add(attr.func.name)
        called.update(f.name for f in attr.list.func)
    return called


def _closure(names, library):
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen or name not in library:
            continue
        seen.add(name)
        for node in library[name].node_def:
            todo.extend(_called_functions(node, library))
    return seen


def _op_problem(op, library, saver):
    """Why ``op`` may not run, or None."""
    from tensorflow.python.framework import op_def_registry

    if op in library:
        return None  # a function call; the function is checked itself
    if saver and op in _SAVER_OPS:
        return None
    if _IO_OP.search(op):
        return "file-system or other I/O"
    op_def = op_def_registry.get(op)
    if op_def is None:
        return "unknown to TensorFlow (a custom kernel)"
    if op_def.is_stateful and op not in _STATEFUL_OK:
        return "has side effects and serving does not need it"
    return None


def check_saved_model_ops(path):
    """Refuses a SavedModel whose graph could touch files or run code.

    Reads the same ``saved_model.pb`` (or ``.pbtxt``/``.cpb``) that
    ``tf.saved_model.load`` would, without loading it, and checks every node
    of the graph and of every function (see the comment above).

    Args:
        path: str. A SavedModel (version) folder.

    Raises:
        ValueError: naming the first refused op and the function holding
            it. Exports must come from a trusted source all the same.
    """
    _tensorflow()
    from tensorflow.python.saved_model import loader_impl

    try:
        proto = loader_impl.parse_saved_model(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable SavedModel "
                         f"({files.first_line(err)})") from None
    for meta_graph in proto.meta_graphs:
        graph = meta_graph.graph_def
        library = {f.signature.name: f for f in graph.library.function}
        saver_def = meta_graph.saver_def
        saver_nodes = {
            name.split(":")[0] for name in (
                saver_def.filename_tensor_name, saver_def.save_tensor_name,
                saver_def.restore_op_name) if name}
        from_saver, from_rest = set(), set()
        for node in graph.node:
            target = from_saver if node.name in saver_nodes else from_rest
            target.update(_called_functions(node, library))
        saver_reach = _closure(from_saver, library)
        other = _closure(from_rest | (library.keys() - saver_reach), library)
        saver_only = saver_reach - other
        for node in graph.node:
            problem = _op_problem(node.op, library, node.name in saver_nodes)
            if problem:
                _refuse(path, node.op, f"graph node {node.name}", problem)
        for name, function in sorted(library.items()):
            for node in function.node_def:
                problem = _op_problem(node.op, library, name in saver_only)
                if problem:
                    _refuse(path, node.op, f"function {name}", problem)


def _refuse(path, op, where, problem):
    raise ValueError(
        f"{path}: refused: op {op} in {where} ({problem}); a SavedModel is "
        "code, load only exports from a trusted source")


@dataclasses.dataclass(frozen=True)
class SavedModelArtifact:
    """An export loaded for local inference; used like ``Artifact``.

    Attributes:
        network: callable. float32 ``(B, z, y, x, 1)`` -> float32
            ``(B, z, y, x, C)`` full-resolution probabilities, computed by
            TensorFlow on the CPU through ``serving_default``.
        config: ExperimentConfig stored with the export.
        stats: IntensityStats stored with the export.
        path: str. The version folder.
        metadata: dict. The whole ``assets/kits_keras.json``.
    """

    network: object
    config: config_lib.ExperimentConfig
    stats: object
    path: str
    metadata: dict


def load_saved_model(path):
    """Loads an export (version folder or model base path) for inference.

    A SavedModel is code: load only exports from a trusted source. One
    whose graph holds file-system or other I/O ops is refused before
    loading (:func:`check_saved_model_ops`).

    Returns:
        SavedModelArtifact. ``predict_case(volume, art.network, art.config,
        art.stats)`` runs the predictor on the exported model.
    """
    from kits_keras.artifact import network_batch
    from kits_keras.artifact import read_metadata
    from kits_keras.data.preprocessing import IntensityStats

    folder = resolve_version_dir(path)
    meta = read_metadata(folder)
    config = config_lib.ExperimentConfig.from_dict(meta["config"])
    stats = IntensityStats.from_dict(meta["intensity_stats"])
    tf = _tensorflow()
    check_saved_model_ops(folder)  # before anything of it runs
    loaded = tf.saved_model.load(folder)
    signature = loaded.signatures[SIGNATURE]

    def network(batch):
        batch = tf.constant(network_batch(batch))
        out = signature(**{INPUT_NAME: batch})[OUTPUT_NAME]
        return np.asarray(out.numpy(), dtype=np.float32)

    # The signature holds only weak references to the variables: keep the
    # loaded object alive as long as the callable.
    network.saved_model = loaded
    log.info("Loaded SavedModel %s", folder)
    return SavedModelArtifact(network, config, stats, folder, meta)


