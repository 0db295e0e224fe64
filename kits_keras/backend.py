"""Choosing the Keras backend per host, and importing TensorFlow safely.

Keras 3 runs one model on JAX or TensorFlow. JAX is the backend wherever there
is an accelerator. On CPU-only hosts TensorFlow's oneDNN 3-D convolutions are
several times faster than XLA:CPU's (see ``benchmarks/train_step.py``), so
``auto`` picks TensorFlow there when it is installed.

All of the package's backend state lives in the environment, and this
module alone reads and writes it (environment variables, because Keras
reads ``KERAS_BACKEND`` once, at its first import, and child processes must
inherit the state):

* ``KERAS_BACKEND``: Keras's own; the backend of this process.
* ``KITS_KERAS_DEFAULT_BACKEND``: the value this package last wrote to
  ``KERAS_BACKEND`` as a default, not a user's choice. A ``KERAS_BACKEND``
  that differs from it (or is set without it) is the user's choice and wins
  over ``auto``; one equal to it is not, so a child process of a script
  that imported this package still resolves ``auto`` for its own host.
"""

import importlib.util
import logging
import os
import sys

log = logging.getLogger(__name__)

BACKENDS = ("auto", "jax", "tensorflow")
_KERAS = "KERAS_BACKEND"
_DEFAULT = "KITS_KERAS_DEFAULT_BACKEND"


def set_import_defaults():
    """What ``import kits_keras`` does: JAX for Keras unless a backend is
    chosen already, and TensorFlow's C++ start-up chatter kept out of the
    user's terminal (TensorFlow is only a host-side tool here)."""
    if not os.environ.get(_KERAS):
        os.environ[_KERAS] = os.environ[_DEFAULT] = "jax"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def user_choice():
    """The user's ``KERAS_BACKEND``, or None when unset or set by this
    package as a default."""
    chosen = os.environ.get(_KERAS)
    if chosen and chosen != os.environ.get(_DEFAULT):
        return chosen
    return None


def hide_accelerators():
    """Makes JAX and TensorFlow run on the CPU (``infer --device cpu``).

    Must run before JAX is first used.
    """
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"


def import_tensorflow():
    """Imports TensorFlow with every GPU hidden from it and returns the module.

    TensorFlow only feeds data and exports models here; if it claimed a GPU it
    would reserve most of its memory and starve JAX.
    """
    set_import_defaults()
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
    chosen = user_choice()
    if chosen:
        return chosen
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
    user = user_choice()
    os.environ[_KERAS] = backend
    if not user:
        # Child processes resolve "auto" again instead of taking this as
        # the user's choice.
        os.environ[_DEFAULT] = backend
    return backend
