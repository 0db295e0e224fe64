"""Fusing element-wise work into one compiled kernel on the TensorFlow
backend.

TensorFlow runs a graph op by op: an expression of ~20 element-wise ops and
reductions (the instance normalisation's forward and backward, the
exp-log loss) makes ~20 full-size passes over memory. On CPU, where the
TensorFlow backend trains (``--backend auto``), XLA fuses them into a few.
Measured on 2 cores (AMX Xeon, tensors of the ``tiny`` step): the
normalisation's forward + backward on 2 x 32 x 64 x 64 x 8 went from 43 to
24-26 ms, the exp-log loss + softmax gradient on 2 x 32 x 64 x 64 x 3 from
48 to 30 ms, and the ``tiny`` training step, both fused, from 0.65 to
0.52 s (under load; the normalisation alone: 0.91 to 0.80 s with oneDNN
capped at AVX2). JAX compiles the whole step anyway, so there is nothing
to do on its backend.
"""

import keras


def xla_fuser():
    """``fuse(fn)`` making ``fn`` one XLA program on the TensorFlow backend;
    None on the others.

    ``fn`` must take and return tensors; it is traced again for each new
    input shape. Use it while training and in the process that predicts
    (:func:`kits_keras.model.layers.fuse_inference`), never in a model
    being exported: a SavedModel for TF Serving must not need XLA (its CPU
    server compiles nothing unless told to), so the exported forward pass
    stays op by op.

    >>> fuse = xla_fuser()
    >>> fuse is None or callable(fuse)
    True
    """
    if keras.backend.backend() != "tensorflow":
        return None
    from kits_keras.backend import import_tensorflow

    tf = import_tensorflow()
    return lambda fn: tf.function(fn, jit_compile=True, autograph=False)


def fused(fn):
    """``fn`` as one XLA program on TensorFlow (:func:`xla_fuser`), else
    ``fn`` itself.

    >>> fused(abs)(-2) == 2
    True
    """
    fuse = xla_fuser()
    return fn if fuse is None else fuse(fn)
