"""kits-keras: multi-scale supervised 3D U-Net for KiTS19 on Keras 3.

Importing the package selects the JAX backend for Keras unless the user has
already chosen one with ``KERAS_BACKEND`` (Keras reads it once, at its first
import). Importing this package never imports TensorFlow; modules that need
TensorFlow (tf.data, TFDS, SavedModel export) get it through
:func:`kits_keras.backend.import_tensorflow`, which hides every GPU from it so
that JAX keeps the accelerator.
"""

from kits_keras import backend as _backend

__version__ = "0.1.0"
__all__ = ["Segmenter"]


def __getattr__(name):
    """``from kits_keras import Segmenter`` imports it (and Keras) only
    then, so ``import kits_keras`` stays light."""
    if name == "Segmenter":
        from kits_keras.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'kits_keras' has no attribute {name!r}")


# Before Keras can be imported: see kits_keras.backend for the state kept in
# the environment.
_backend.set_import_defaults()
