"""Exponential moving average of the weights (``train.ema_momentum``).

Keras' optimizers keep the average themselves (``use_ema``): one more
multiply-add per weight inside the compiled step, saved with the optimizer
in every checkpoint, so ``--resume`` continues it exactly. Training goes on
from the raw weights; validation and the best-model artifact use the
average, and Keras leaves the average in the model when ``fit`` ends.

Why: with a batch of 2, the ``tiny`` network's full-volume validation Dice
moved by up to 0.12 between checks 125 steps apart even at the end of the
poly schedule (``benchmarks/results/quality_regions_extra_tumours.json``'s
history), so the weights that happen to be current at a check decide the
model. The mean of the last few hundred steps' weights is the usual cure
(Polyak averaging); measured on ``tiny`` it did not help (``tiny.py``).
"""

import contextlib

import keras


def moving_averages(model):
    """The optimizer's moving average of each trainable variable of
    ``model``, in ``model.trainable_variables`` order, or None when the
    model has no optimizer with ``use_ema`` built yet."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not getattr(optimizer, "use_ema", False):
        return None
    averages = getattr(optimizer, "_model_variables_moving_average", None)
    if averages is None:  # not built: no step taken
        return None
    if len(averages) != len(model.trainable_variables):
        raise ValueError(
            f"The optimizer averages {len(averages)} variables, the model "
            f"has {len(model.trainable_variables)} trainable ones")
    return list(averages)


def averaged_weights(model):
    """``model.get_weights()`` with each trainable weight replaced by its
    moving average (the raw weights when there is none).

    Returns:
        list of numpy arrays, in ``model.weights`` order.
    """
    averages = moving_averages(model)
    if averages is None:
        return model.get_weights()
    by_variable = {id(v): a for v, a in zip(model.trainable_variables,
                                            averages)}
    return [keras.ops.convert_to_numpy(by_variable.get(id(v), v))
            for v in model.weights]


@contextlib.contextmanager
def averaged(model):
    """Within: ``model``'s trainable variables hold their moving averages;
    on exit (also after an error) the raw weights are back. Nothing changes
    without averages.

    Example:
        >>> import numpy as np
        >>> model = keras.Sequential([keras.Input((1,)),
        ...                           keras.layers.Dense(1, use_bias=False)])
        >>> model.compile(keras.optimizers.SGD(0.1, use_ema=True,
        ...                                    ema_momentum=0.5), "mse")
        >>> model.layers[0].set_weights([np.zeros((1, 1))])
        >>> x, y = np.ones((1, 1)), np.ones((1, 1))
        >>> for _ in range(2):  # w: 0 -> 0.2 -> 0.36; average 0.2 -> 0.28
        ...     _ = model.train_on_batch(x, y)
        >>> with averaged(model):
        ...     print(round(float(model.predict_on_batch(x)[0, 0]), 2))
        0.28
        >>> round(float(model.predict_on_batch(x)[0, 0]), 2)
        0.36
    """
    averages = moving_averages(model)
    if averages is None:
        yield model
        return
    variables = model.trainable_variables
    raw = [keras.ops.convert_to_numpy(v) for v in variables]
    for variable, average in zip(variables, averages):
        # A copy: on JAX the evaluation step donates the variables' buffers,
        # which would delete the optimizer's own average with them.
        variable.assign(keras.ops.convert_to_numpy(average))
    try:
        yield model
    finally:
        for variable, value in zip(variables, raw):
            variable.assign(value)


class ValidateAveraged(keras.callbacks.Callback):
    """Makes Keras' patch validation inside ``fit`` (``validation_data``)
    see the averaged weights: swapped in on ``on_test_begin``, the raw ones
    back on ``on_test_end``."""

    def __init__(self):
        super().__init__()
        self._context = None

    def on_test_begin(self, logs=None):
        self._context = averaged(self.model)
        self._context.__enter__()

    def on_test_end(self, logs=None):
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(None, None, None)
