"""A stateless, jitted JAX training step for the U-Net (no TensorFlow).

``model.fit`` on the JAX backend does the same work; this step exists so that
the benchmark (and training loops that want it) can time and cost-analyse one
compiled XLA program: forward, multi-scale loss, backward and the optimizer
update, with the state donated so XLA updates it in place.

Uses Keras' stateless API (``model.stateless_call``,
``optimizer.stateless_apply``), so the optimizer and its variables are the
ones ``model.compile`` would use and can be written back into the model.

Example:
    >>> import keras, numpy as np
    >>> from kits_keras.config import get_config
    >>> from kits_keras.model.unet import build_unet
    >>> cfg = get_config("tiny")
    >>> model = build_unet(cfg)
    >>> step, state = make_train_step(model, cfg.loss,
    ...                               keras.optimizers.Adam(3e-4),
    ...                               output_mode=cfg.model.output_mode)
    >>> x = np.zeros((1, 8, 16, 16, 1), "float32")
    >>> ys = [np.zeros((1, 8 // f, 16 // f, 16 // f), "int32")
    ...       for f in (1, 2, 4)]
    >>> state, loss = step(state, x, ys)
    >>> bool(np.isfinite(float(loss)))
    True
"""

import dataclasses

import keras

from kits_keras.model.losses import multi_scale_loss


@dataclasses.dataclass
class TrainState:
    """Values of the model's and optimizer's variables (JAX arrays)."""

    trainable: list
    non_trainable: list
    optimizer: list


def _require_jax():
    if keras.backend.backend() != "jax":
        raise ValueError(
            "make_train_step needs the JAX backend. Received: "
            f"backend={keras.backend.backend()!r}"
        )
    import jax

    return jax


def _register_state(jax):
    try:
        jax.tree_util.register_pytree_node(
            TrainState,
            lambda s: ((s.trainable, s.non_trainable, s.optimizer), None),
            lambda _, children: TrainState(*children),
        )
    except ValueError:
        pass  # already registered


def init_state(model, optimizer):
    """Current variable values of ``model`` and ``optimizer`` (built here)."""
    optimizer.build(model.trainable_variables)
    return TrainState(
        trainable=[v.value for v in model.trainable_variables],
        non_trainable=[v.value for v in model.non_trainable_variables],
        optimizer=[v.value for v in optimizer.variables],
    )


def assign_state(model, optimizer, state):
    """Writes ``state`` back into the Keras variables (for saving)."""
    for var, value in zip(model.trainable_variables, state.trainable):
        var.assign(value)
    for var, value in zip(model.non_trainable_variables, state.non_trainable):
        var.assign(value)
    for var, value in zip(optimizer.variables, state.optimizer):
        var.assign(value)


def make_train_step(model, loss_config, optimizer, jit=True,
                    output_mode="softmax", label_set="kits19"):
    """A training step ``step(state, x, ys) -> (state, loss)``.

    Args:
        model: keras.Model from :func:`kits_keras.model.unet.build_unet`.
        loss_config: LossConfig of
            :func:`kits_keras.model.losses.multi_scale_loss`.
        optimizer: keras.optimizers.Optimizer (e.g. ``Adam(3e-4)``).
        jit: bool. Compile with ``jax.jit``, donating the state. Defaults to
            True.
        output_mode: str. ``model.output_mode`` of the model's config
            (which loss). Defaults to "softmax".
        label_set: str. ``data.label_set`` (the regions). Defaults to
            "kits19".

    Returns:
        ``(step, state)``: the step function and the initial TrainState.
        ``x`` is ``(B, z, y, x, 1)`` float32; ``ys`` a list of int label
        arrays, one per output at its resolution, full resolution first.
        The returned loss is a float32 scalar.
    """
    jax = _require_jax()
    _register_state(jax)
    state = init_state(model, optimizer)
    grad_fn = _value_and_grad(jax, model, loss_config, output_mode,
                              label_set)

    def step(state, x, ys):
        (loss, non_trainable), grads = grad_fn(
            state.trainable, state.non_trainable, x, ys
        )
        trainable, opt_vars = optimizer.stateless_apply(
            state.optimizer, grads, state.trainable
        )
        return TrainState(trainable, non_trainable, opt_vars), loss

    if jit:
        step = jax.jit(step, donate_argnums=0)
    return step, state


def _value_and_grad(jax, model, loss_config, output_mode="softmax",
                    label_set="kits19"):
    def loss_fn(trainable, non_trainable, x, ys):
        outputs, non_trainable = model.stateless_call(
            trainable, non_trainable, x, training=True
        )
        loss = multi_scale_loss(ys, outputs, loss_config, output_mode,
                                label_set)
        return loss, non_trainable

    return jax.value_and_grad(loss_fn, has_aux=True)


def make_loss_and_grad_norm(model, loss_config, jit=True,
                            output_mode="softmax", label_set="kits19"):
    """``fn(state, x, ys) -> (loss, global gradient norm)``, no update.

    For numerics checks (bfloat16 against float32 on one batch): the loss
    and gradients of the training step, without the optimizer
    (``output_mode`` and ``label_set`` as :func:`make_train_step`'s).
    """
    jax = _require_jax()
    _register_state(jax)
    grad_fn = _value_and_grad(jax, model, loss_config, output_mode,
                              label_set)

    def loss_and_norm(state, x, ys):
        (loss, _), grads = grad_fn(state.trainable, state.non_trainable, x,
                                   ys)
        ops = keras.ops
        squares = [ops.sum(ops.square(ops.cast(g, "float32")))
                   for g in grads]
        return loss, ops.sqrt(sum(squares))

    return jax.jit(loss_and_norm) if jit else loss_and_norm


def make_forward(model, jit=True):
    """Inference ``forward(state, x) -> outputs`` (list, full res first)."""
    jax = _require_jax()
    _register_state(jax)

    def forward(state, x):
        outputs, _ = model.stateless_call(
            state.trainable, state.non_trainable, x, training=False
        )
        return outputs

    return jax.jit(forward) if jit else forward
