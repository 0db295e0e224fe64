"""kits-keras: multi-scale supervised 3D U-Net for KiTS19 on Keras 3.

Importing the package selects the JAX backend for Keras unless the user has
already chosen one with ``KERAS_BACKEND`` (Keras reads it once, at its first
import). Importing this package never imports TensorFlow; modules that need
TensorFlow (tf.data, TFDS, SavedModel export) get it through
:func:`kits_keras.backend.import_tensorflow`, which hides every GPU from it so
that JAX keeps the accelerator.
"""

import os

__version__ = "0.1.0"
__all__ = ["Segmenter"]


def __getattr__(name):
    """``from kits_keras import Segmenter`` imports it (and Keras) only
    then, so ``import kits_keras`` stays light."""
    if name == "Segmenter":
        from kits_keras.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'kits_keras' has no attribute {name!r}")

_chosen = os.environ.get("KERAS_BACKEND")
# A KERAS_BACKEND that this package set itself (in this process or in a
# parent whose environment was inherited) is a default, not a user's choice.
if _chosen and _chosen != os.environ.get("KITS_KERAS_DEFAULT_BACKEND"):
    # Remembered so that ``backend="auto"`` honours an explicit user choice.
    os.environ.setdefault("KITS_KERAS_USER_BACKEND", _chosen)
if not _chosen:
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["KITS_KERAS_DEFAULT_BACKEND"] = "jax"
del _chosen
# TensorFlow is only a host-side tool here (tf.data, TFDS, export): keep its
# C++ start-up chatter out of the user's terminal.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
