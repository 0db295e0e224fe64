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
:func:`kits_keras.inference.saved_model.load_saved_model` reads it back, so
the NumPy predictor (:func:`kits_keras.inference.predict.predict_case`) runs
unchanged on the exported model.
"""

import datetime
import logging
import os
import shutil
import tempfile
import time

from kits_keras import files

from kits_keras import io
from kits_keras.orientation import check_orientation
from kits_keras.backend import import_tensorflow
from kits_keras.inference.saved_model import ASSET_NAME
from kits_keras.inference.saved_model import FORMAT
from kits_keras.inference.saved_model import FORMAT_VERSION
from kits_keras.inference.saved_model import INPUT_NAME
from kits_keras.inference.saved_model import OUTPUT_NAME
from kits_keras.inference.saved_model import SIGNATURE

log = logging.getLogger(__name__)

# The unchecked forward pass, registered first; ``serving_default`` wraps it.
RAW_ENDPOINT = "serve"
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
    from kits_keras.model.regions import num_outputs
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
            # Classes (softmax), or one sigmoid per region
            # (model.output_mode "regions", outermost first).
            "output_shape": [None, None, None, None,
                             num_outputs(config.model, config.data.label_set)],
            "output_mode": config.model.output_mode,
            "output_dtype": "float32",
            "spatial_multiple": list(total_stride(config)),
            "fixed_size": bool(fixed_size),
        },
        "intensity_stats": stats_dict,
        "target_spacing": list(config.data.target_spacing),
        "patch_size": list(config.data.patch_size),
        "class_names": list(io.class_names(config.model.num_classes)),
        "label_values": list(range(config.model.num_classes)),
        ORIENTATION_KEY: "".join(check_orientation(orientation)),
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
    out_dir, target = _version_target(out_dir, version)
    model, config, stats, source, orientation = _exportable(
        model, config, stats, orientation)

    def write(tmp):
        _write_saved_model(model, tmp, config, fixed_size)
        _write_metadata(tmp, metadata(config, stats, source, fixed_size,
                                      orientation))

    start = time.perf_counter()
    _write_version(out_dir, version, target, write)
    log.info(
        "Exported %s in %.1f s (%.1f MB).", target,
        time.perf_counter() - start, folder_size(target) / 1e6,
    )
    return target


def _version_target(out_dir, version):
    """``(out_dir, out_dir/<version>)``, absolute; refuses a bad or taken
    version."""
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
    return out_dir, target


def _exportable(model, config, stats, orientation):
    """``(model, config, stats, source, orientation)`` to export.

    A path is read with :func:`kits_keras.artifact.load_artifact` (its own
    config, stats and orientation); a keras.Model needs ``config`` and
    ``stats``. A deep-supervision model is cut to its full-resolution output.
    """
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
    return _full_resolution(model), config, stats, source, orientation


def _write_version(out_dir, version, target, write):
    """Runs ``write(tmp)`` on a hidden folder in ``out_dir``, then renames
    it to ``target``; on any failure removes it (and ``out_dir`` if this
    call created it and it is empty)."""
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=out_dir)
    try:
        # mkdtemp makes it private (0700); a TF Serving container running
        # as another user must be able to read the version folder.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        write(tmp)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise


def _full_resolution(model):
    if len(model.outputs) == 1:
        return model
    from kits_keras.model.unet import full_resolution_model

    return full_resolution_model(model)


def _write_saved_model(model, path, config, fixed_size):
    """Traces the forward pass into a SavedModel at ``path``."""
    tf = import_tensorflow()
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


def folder_size(path):
    """Bytes in all files under ``path``."""
    total = 0
    for root, _, names in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in names)
    return total
