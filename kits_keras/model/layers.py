"""Custom Keras layers of the U-Net (backend-agnostic: ``keras.ops`` only;
on TensorFlow the normalisation is compiled with XLA while training,
:func:`kits_keras.model.fusion.xla_fuser`)."""

import keras
from keras import ops

from kits_keras.model.fusion import xla_fuser


def _spatial_mean(x):
    return ops.mean(x, axis=(1, 2, 3), keepdims=True)


def instance_norm_leaky_relu(x, gamma, beta, epsilon, negative_slope,
                             fuse=None):
    """``leaky_relu(gamma * (x - mean) / sqrt(var + eps) + beta)`` per sample
    and channel, with a hand-written backward pass.

    Autodiff of the same expression keeps two full-size tensors per layer for
    the backward pass (the centred input and the normalised output before the
    activation); this keeps none but ``x`` itself, which the preceding
    convolution produced anyway, and the per-channel statistics, and
    recomputes the rest. On the TensorFlow backend that is about a third of
    the training step's peak memory (``benchmarks/train_step.py``).

    Args:
        x: ``(batch, z, y, x, channels)`` tensor, any float dtype; statistics
            and gradients are computed in float32.
        gamma, beta: ``(channels,)`` scale and shift.
        epsilon: added to the variance.
        negative_slope: leaky ReLU slope; ``None`` for no activation.
        fuse: None, or a function that compiles a function of tensors into
            one fused kernel (:func:`kits_keras.model.fusion.xla_fuser`);
            the forward and the backward computation are each compiled
            with it.

    Returns:
        Tensor of the shape and dtype of ``x``.
    """

    def normalise(x, gamma, beta):
        return _instance_norm_forward(x, gamma, beta, epsilon, negative_slope)

    def differentiate(upstream, x, gamma, beta, mean, rstd):
        return _instance_norm_grad(upstream, x, gamma, beta, mean, rstd,
                                   negative_slope)

    if fuse is not None:
        normalise, differentiate = fuse(normalise), fuse(differentiate)

    @ops.custom_gradient
    def forward(x, gamma, beta):
        y, mean, rstd = normalise(x, gamma, beta)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return differentiate(upstream, x, gamma, beta, mean, rstd)

        return y, grad

    return forward(x, gamma, beta)


def _instance_norm_forward(x, gamma, beta, epsilon, negative_slope):
    """``(y, mean, rstd)``: the output and the float32 per-sample,
    per-channel statistics the backward pass needs."""
    x32 = ops.cast(x, "float32")
    gamma32 = ops.cast(gamma, "float32")
    mean = _spatial_mean(x32)
    # Two-pass variance: the one-pass E[x^2] - E[x]^2 cancels badly when
    # a channel's mean is large against its spread.
    rstd = ops.rsqrt(_spatial_mean(ops.square(x32 - mean)) + epsilon)
    # The affine transform folded into one multiply-add, applied in the
    # compute dtype so bfloat16 activations stay bfloat16.
    scale = rstd * gamma32
    shift = ops.cast(beta, "float32") - mean * scale
    z = x * ops.cast(scale, x.dtype) + ops.cast(shift, x.dtype)
    y = z if negative_slope is None else ops.leaky_relu(z, negative_slope)
    return y, mean, rstd


def _instance_norm_grad(upstream, x, gamma, beta, mean, rstd,
                        negative_slope):
    """``(dx, dgamma, dbeta)`` of :func:`instance_norm_leaky_relu` from the
    stored ``x`` and per-channel float32 ``mean`` and ``rstd`` only."""
    # dx = k * (dz - mean(dz) - x_hat * mean(dz * x_hat)) with
    # k = gamma * rstd, written as dz * k + xc * b + c (xc = x - mean,
    # b and c per sample and channel) so that only two full-size
    # temporaries live at once; xc keeps it free of the cancellation
    # that x * b + c would suffer when the mean dwarfs the spread.
    dz = ops.cast(upstream, "float32")
    # Cast again rather than keep the forward's float32 copy: under
    # bfloat16 that copy would be a second, twice-as-large residual.
    xc = ops.cast(x, "float32") - mean
    k = rstd * ops.cast(gamma, "float32")
    if negative_slope is not None:
        # The activation's derivative from the recomputed pre-activation
        # (neither it nor x_hat is stored).
        z = xc * k + ops.cast(beta, "float32")
        dz = ops.where(z > 0, dz, dz * negative_slope)
    mean_dz = _spatial_mean(dz)
    mean_dz_xhat = _spatial_mean(dz * xc) * rstd
    dx = dz * k + (xc * (-k * rstd * mean_dz_xhat) - k * mean_dz)
    voxels = ops.cast(ops.prod(ops.shape(x)[1:4]), "float32")
    dbeta = ops.sum(mean_dz, axis=(0, 1, 2, 3)) * voxels
    dgamma = ops.sum(mean_dz_xhat, axis=(0, 1, 2, 3)) * voxels
    return (ops.cast(dx, x.dtype), ops.cast(dgamma, gamma.dtype),
            ops.cast(dbeta, beta.dtype))


@keras.saving.register_keras_serializable(package="kits_keras")
class InstanceNormalization(keras.layers.Layer):
    """Instance normalisation over the spatial axes of a channels-last volume,
    optionally fused with a leaky ReLU.

    Each sample and channel is normalised by its own mean and variance over
    ``(z, y, x)``, then scaled and shifted by a learned per-channel
    ``gamma``/``beta`` (nnU-Net's ``InstanceNorm3d(affine=True)``). Equal to
    ``keras.layers.GroupNormalization(groups=-1)`` to within 1e-6, and about
    1.5x faster under XLA because the affine transform is folded into one
    multiply-add (measured beside the peers' train step; see the
    benchmarks section of README.md).

    With ``negative_slope`` set, a leaky ReLU follows in the same layer and
    the backward pass of both is written by hand
    (:func:`instance_norm_leaky_relu`): the layer then keeps only its input
    for the backward pass, as PyTorch does with an in-place ``LeakyReLU``.

    Statistics are computed in float32 even under a bfloat16 policy: a
    bfloat16 mean over 400k voxels would lose most of its digits.

    Reference: Ulyanov et al., "Instance Normalization: The Missing Ingredient
    for Fast Stylization", 2016.

    Args:
        epsilon: float. Added to the variance. Defaults to 1e-5 (PyTorch).
        negative_slope: float or None. Slope of the fused leaky ReLU; None
            (default) for normalisation alone.
        **kwargs: base layer arguments (``name``, ``dtype``).

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(3, 2, (2, 4, 4, 4, 5))
        >>> y = InstanceNormalization()(x.astype("float32"))
        >>> bool(np.allclose(np.mean(y, axis=(1, 2, 3)), 0, atol=1e-5))
        True
    """

    def __init__(self, epsilon=1e-5, negative_slope=None, **kwargs):
        super().__init__(**kwargs)
        if epsilon <= 0:
            raise ValueError(
                f"epsilon must be positive. Received: epsilon={epsilon}"
            )
        self.epsilon = float(epsilon)
        self.negative_slope = (None if negative_slope is None
                               else float(negative_slope))
        # Inference fused too (:func:`fuse_inference`): a choice of the
        # process running the model, not part of the saved model, so that
        # an export of the same file stays op by op.
        self.fuse_inference = False

    def build(self, input_shape):
        if len(input_shape) != 5 or input_shape[-1] is None:
            raise ValueError(
                "InstanceNormalization expects (batch, z, y, x, channels) "
                f"with known channels. Received: input_shape={input_shape}"
            )
        channels = input_shape[-1]
        # autocast=False: under mixed_bfloat16 the scale and shift are read
        # in float32, not rounded to 8 bits of mantissa first.
        self.gamma = self.add_weight(
            shape=(channels,), initializer="ones", name="gamma",
            autocast=False,
        )
        self.beta = self.add_weight(
            shape=(channels,), initializer="zeros", name="beta",
            autocast=False,
        )

    def call(self, inputs, training=None):
        # Read the variables here, outside the custom gradient, so that
        # their gradients flow through ordinary reads on every backend.
        return instance_norm_leaky_relu(
            inputs, ops.cast(self.gamma, "float32"),
            ops.cast(self.beta, "float32"), self.epsilon, self.negative_slope,
            fuse=xla_fuser() if training or self.fuse_inference else None,
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon,
                       "negative_slope": self.negative_slope})
        return config


@keras.saving.register_keras_serializable(package="kits_keras")
class HeNormal(keras.initializers.Initializer):
    """He (Kaiming) normal initialisation for leaky-ReLU nets, drawn by NumPy.

    ``std = sqrt(2 / ((1 + a**2) * fan_in))`` with ``fan_in`` the product of
    all kernel dimensions but the last (for ``Conv3D`` kernels
    ``(k, k, k, in, out)`` that is ``k**3 * in``; for ``Conv3DTranspose``
    kernels ``(k, k, k, out, in)`` it is ``k**3 * out``, as PyTorch computes
    it). This is nnU-Net's ``InitWeights_He(1e-2)``.

    The draw happens on the host with NumPy's global generator (seeded by
    ``keras.utils.set_random_seed``) because on the JAX backend every weight
    shape would otherwise compile its own XLA random kernel: about 30 s of
    start-up for the paper network on a CPU, paid again by every
    ``load_artifact`` before the weights are overwritten.

    Args:
        negative_slope: float. Leaky ReLU slope ``a``. Defaults to 0.01.
    """

    def __init__(self, negative_slope=0.01):
        self.negative_slope = float(negative_slope)

    def __call__(self, shape, dtype=None):
        import numpy as np

        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        std = (2.0 / ((1.0 + self.negative_slope**2) * fan_in)) ** 0.5
        values = np.random.standard_normal(tuple(shape)) * std
        return ops.convert_to_tensor(values.astype("float32"), dtype=dtype)

    def get_config(self):
        return {"negative_slope": self.negative_slope}


def fuse_inference(model, enabled=True):
    """Runs ``model``'s instance normalisations as XLA programs at inference
    too (on the TensorFlow backend; nothing changes on the others).

    For the process that predicts with the model (``kits-keras infer``,
    validation during ``fit``): under ``ONEDNN_MAX_CPU_ISA=AVX2`` on 2
    cores the paper network's forward pass on 2 x 48 x 96 x 96 went from
    10.0 to 8.6 s in one process, alternating (AMX Xeon, under load); in
    two separate ``benchmarks/train_step.py`` runs alone, 3.2 -> 2.9 s
    natively and 4.4 -> 4.6 s under the cap, within that host's ~10 %
    run-to-run noise. One XLA compile per layer and batch shape on the
    first call. Not for a model about to be exported:
    a SavedModel for TF Serving must not need XLA (:func:`xla_fuser`).

    Args:
        model: keras.Model; its layers are changed in place (shared layers
            of another model built from it too, which see it when they next
            trace a function).
        enabled: bool.

    Returns:
        ``model``.
    """
    stack = list(model.layers)
    while stack:
        layer = stack.pop()
        if isinstance(layer, InstanceNormalization):
            layer.fuse_inference = bool(enabled)
        stack.extend(getattr(layer, "layers", []))  # nested models
    # The choice is read when a predict function is traced: drop the one
    # traced before (another model sharing these layers keeps its own).
    if getattr(model, "predict_function", None) is not None:
        model.predict_function = None
    return model
