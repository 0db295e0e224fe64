"""Finding, checking and loading a kits_keras SavedModel export.

An export (:func:`kits_keras.inference.export.export_saved_model` writes it)
is a TF Serving model base path ``OUT_DIR/<version>/`` whose version folder
holds ``saved_model.pb``, ``variables/`` and ``assets/kits_keras.json``. This
module owns that format's names, finds the version folder TF Serving would
serve (:func:`resolve_version_dir`), refuses assets of another format
(:func:`check_format`) and graphs that could touch files
(:func:`check_saved_model_ops`), and loads an export for local inference
(:func:`load_saved_model`), so the NumPy predictor
(:func:`kits_keras.inference.predict.predict_case`) runs unchanged on it.

The ``serving_default`` signature takes ``image``: float32
``(batch, z, y, x, 1)`` and returns ``probabilities``: float32
``(batch, z, y, x, C)``.
"""

import dataclasses
import logging
import os
import re

import numpy as np

from kits_keras import config as config_lib
from kits_keras import files
from kits_keras import io
from kits_keras.backend import import_tensorflow

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
SIGNATURE = "serving_default"
ASSET_NAME = "kits_keras.json"
FORMAT = "kits_keras.saved_model"
FORMAT_VERSION = 1


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
    import_tensorflow()
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
    from kits_keras.data.intensity import IntensityStats

    folder = resolve_version_dir(path)
    meta = read_metadata(folder)
    config = config_lib.ExperimentConfig.from_dict(meta["config"])
    stats = IntensityStats.from_dict(meta["intensity_stats"])
    tf = import_tensorflow()
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


