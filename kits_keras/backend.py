"""Choosing the Keras backend per host, and importing TensorFlow safely.

Keras 3 runs one model on JAX or TensorFlow. JAX is the backend wherever there
is an accelerator. On CPU-only hosts TensorFlow's oneDNN 3-D convolutions are
several times faster than XLA:CPU's (see ``benchmarks/train_step.py``), so
``auto`` picks TensorFlow there when it is installed.
"""

import importlib.util
import logging
import os
import sys

log = logging.getLogger(__name__)

BACKENDS = ("auto", "jax", "tensorflow")


def import_tensorflow():
    """Imports TensorFlow with every GPU hidden from it and returns the module.

    TensorFlow only feeds data and exports models here; if it claimed a GPU it
    would reserve most of its memory and starve JAX.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        # Already initialised with GPUs hidden (or by the user): nothing to do.
        pass
    return tf


def has_accelerator():
    """True when JAX sees a GPU or TPU."""
    if importlib.util.find_spec("jax") is None:
        return False
    import jax

    return any(d.platform != "cpu" for d in jax.devices())


def resolve_backend(name="auto"):
    """Returns the concrete backend name for ``name`` on this host.

    Args:
        name: str. ``"auto"``, ``"jax"`` or ``"tensorflow"``. ``"auto"`` gives
            ``KERAS_BACKEND`` when the user set it, JAX on hosts with an
            accelerator, TensorFlow on CPU-only hosts where it is installed,
            and JAX otherwise.
    """
    if name not in BACKENDS:
        raise ValueError(
            f"Unknown backend. Expected one of {BACKENDS}. Received: "
            f"backend={name!r}"
        )
    if name != "auto":
        return name
    user_choice = os.environ.get("KITS_KERAS_USER_BACKEND")
    if user_choice:
        return user_choice
    if has_accelerator():
        return "jax"
    if importlib.util.find_spec("tensorflow") is not None:
        return "tensorflow"
    return "jax"


def select_backend(name="auto"):
    """Sets ``KERAS_BACKEND`` for ``name`` before Keras is imported.

    Returns the backend in force. If Keras was already imported with another
    backend, that backend stays and a warning says so.
    """
    backend = resolve_backend(name)
    if "keras" in sys.modules:
        import keras

        current = keras.backend.backend()
        if current != backend:
            log.warning(
                "Keras is already running on %s; cannot switch to %s in this "
                "process.",
                current,
                backend,
            )
        return current
    os.environ["KERAS_BACKEND"] = backend
    if not os.environ.get("KITS_KERAS_USER_BACKEND"):
        # Child processes resolve "auto" again instead of taking this as
        # the user's choice.
        os.environ["KITS_KERAS_DEFAULT_BACKEND"] = backend
    return backend
