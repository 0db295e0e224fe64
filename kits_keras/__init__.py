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

if os.environ.get("KERAS_BACKEND"):
    # Remembered so that ``backend="auto"`` honours an explicit user choice.
    os.environ.setdefault("KITS_KERAS_USER_BACKEND", os.environ["KERAS_BACKEND"])
os.environ.setdefault("KERAS_BACKEND", "jax")
# TensorFlow is only a host-side tool here (tf.data, TFDS, export): keep its
# C++ start-up chatter out of the user's terminal.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
