"""Multi-scale supervised 3-D U-Net (Keras functional, channels last).

The network of "Multi Scale Supervised 3D U-Net for Kidney and Tumor
Segmentation" (KiTS19), laid out as nnU-Net's ``PlainConvUNet``: per level two
3x3x3 convolutions, each followed by instance normalisation and leaky ReLU;
downsampling by the stride of the first convolution of a level; upsampling by
a transposed convolution whose kernel equals its stride; skips by
concatenation; a 1x1x1 convolution + softmax head at every decoder level
(sigmoid per region with ``model.output_mode="regions"``).

Layer names say where a layer sits: ``enc{level}_conv{i}`` (+ ``_norm``, which
with instance normalisation also applies the leaky ReLU; batch normalisation
is followed by a separate ``_act``), ``dec{level}_up``, ``dec{level}_concat``,
``dec{level}_conv{i}``, ``head{level}`` (the softmax output; its convolution
is ``head{level}_conv``).
Level 0 is full resolution. Tensors are ``(batch, z, y, x, channels)``.

The model imports and runs without TensorFlow (JAX backend).
"""

import keras

from kits_keras.model import regions as regions_lib
from kits_keras.model import strides as strides_lib
from kits_keras.model.layers import HeNormal
from kits_keras.model.layers import InstanceNormalization


def level_filters(model_config):
    """Features per level: ``base * 2**level`` capped at ``max_filters``.

    Example:
        >>> from kits_keras.config import ModelConfig
        >>> level_filters(ModelConfig())
        (30, 60, 120, 240, 320)
    """
    return tuple(
        min(model_config.base_filters * 2**level, model_config.max_filters)
        for level in range(model_config.num_levels)
    )


def apply_conv_norm_act(x, filters, stride, name, norm="instance",
                        negative_slope=0.01):
    """3x3x3 convolution -> normalisation -> leaky ReLU.

    Layers are named ``name`` and ``{name}_norm``. Instance normalisation and
    the leaky ReLU are one layer (:class:`InstanceNormalization` with
    ``negative_slope``), whose hand-written backward pass keeps only its
    input; batch normalisation is followed by a ``{name}_act`` layer. The
    convolution keeps its bias (as nnU-Net, so that parameter counts match
    ``PlainConvUNet``) although the normalisation makes it redundant.
    """
    x = keras.layers.Conv3D(
        filters, 3, strides=stride, padding="same", name=name,
        kernel_initializer=HeNormal(negative_slope),
    )(x)
    if norm == "instance":
        return InstanceNormalization(
            negative_slope=negative_slope, name=f"{name}_norm"
        )(x)
    if norm != "batch":
        raise ValueError(
            "Unknown norm. Expected 'instance' or 'batch'. Received: "
            f"norm={norm!r}"
        )
    x = keras.layers.BatchNormalization(epsilon=1e-5, name=f"{name}_norm")(x)
    return keras.layers.LeakyReLU(
        negative_slope=negative_slope, name=f"{name}_act"
    )(x)


def apply_conv_block(x, filters, stride, name, norm="instance",
                     negative_slope=0.01):
    """Two conv-norm-act units; the first carries ``stride``.

    ``name`` is the level prefix (``"enc2"``); layers become
    ``enc2_conv1``, ``enc2_conv1_norm``, ..., ``enc2_conv2_norm``.
    """
    x = apply_conv_norm_act(
        x, filters, stride, f"{name}_conv1", norm, negative_slope
    )
    return apply_conv_norm_act(
        x, filters, 1, f"{name}_conv2", norm, negative_slope
    )


def apply_up_block(x, skip, filters, stride, name, norm="instance",
                   negative_slope=0.01):
    """Transposed conv (kernel = stride) -> concat with the skip -> block."""
    x = keras.layers.Conv3DTranspose(
        filters, kernel_size=stride, strides=stride, name=f"{name}_up",
        kernel_initializer=HeNormal(negative_slope),
    )(x)
    x = keras.layers.Concatenate(axis=-1, name=f"{name}_concat")([x, skip])
    return apply_conv_block(x, filters, 1, name, norm, negative_slope)


def apply_head(x, channels, name, activation="softmax"):
    """1x1x1 convolution + ``activation`` ("softmax" over classes, or
    "sigmoid" per region), the activation in float32.

    Under a ``mixed_bfloat16`` policy the logits are bfloat16 but the
    probabilities (and hence the loss) are float32.
    """
    x = keras.layers.Conv3D(
        channels, 1, name=f"{name}_conv", kernel_initializer=HeNormal()
    )(x)
    return keras.layers.Activation(activation, dtype="float32", name=name)(x)


def build_unet(config):
    """Builds the multi-scale supervised U-Net of an experiment.

    Args:
        config: ExperimentConfig. Uses ``config.model`` and the strides of
            :func:`kits_keras.model.strides.model_strides`.

    Returns:
        keras.Model. Input ``(batch, z, y, x, 1)`` float32 with each spatial
        size divisible by the total stride; outputs a list of probabilities
        ``(batch, z/f, y/f, x/f, C)`` float32, one per decoder level, full
        resolution first, ``f`` as in
        :func:`kits_keras.model.strides.output_strides`: softmax over
        ``C = num_classes`` classes, or with ``model.output_mode="regions"``
        one sigmoid per region of ``data.label_set``
        (:mod:`kits_keras.model.regions`).

    Example:
        >>> from kits_keras.config import get_config
        >>> model = build_unet(get_config("paper"))
        >>> [tuple(o.shape[1:]) for o in model.outputs][:2]
        [(None, None, None, 3), (None, None, None, 3)]
        >>> [o.shape[-1] for o in build_unet(get_config("tiny")).outputs]
        [2, 2, 2]
    """
    mc = config.model
    strides = strides_lib.model_strides(config)
    if mc.num_levels < 2:
        raise ValueError(
            f"A U-Net needs at least 2 levels. Received: num_levels="
            f"{mc.num_levels}"
        )
    if len(strides) != mc.num_levels or tuple(strides[0]) != (1, 1, 1):
        raise ValueError(
            "strides must give one (z, y, x) stride per level, the first "
            f"(1, 1, 1). Received: strides={strides}, num_levels="
            f"{mc.num_levels}"
        )
    filters = level_filters(mc)
    block = dict(norm=mc.norm, negative_slope=mc.negative_slope)
    channels = regions_lib.num_outputs(mc, config.data.label_set)
    activation = "sigmoid" if mc.output_mode == "regions" else "softmax"

    inputs = keras.Input((None, None, None, 1), name="image")
    x = inputs
    skips = []
    for level in range(mc.num_levels):
        x = apply_conv_block(
            x, filters[level], tuple(strides[level]), f"enc{level}", **block
        )
        skips.append(x)
    outputs = []
    for level in range(mc.num_levels - 2, -1, -1):
        x = apply_up_block(
            x, skips[level], filters[level], tuple(strides[level + 1]),
            f"dec{level}", **block,
        )
        outputs.append(apply_head(x, channels, f"head{level}", activation))
    return keras.Model(inputs, outputs[::-1], name=f"unet_{config.name}")


def full_resolution_model(model):
    """The full-resolution output of ``model`` alone, sharing its weights.

    For inference and export: the coarser heads are not computed.
    """
    return keras.Model(
        model.inputs[0], model.outputs[0], name=f"{model.name}_full_res"
    )


def total_stride(config):
    """Product of all strides per axis ``(z, y, x)``: patch sizes must be
    multiples of it."""
    total = [1, 1, 1]
    for stride in strides_lib.model_strides(config):
        total = [t * s for t, s in zip(total, stride)]
    return tuple(total)


def count_flops(config, patch_size):
    """Convolution FLOPs of one forward pass on one patch (2 per MAC).

    Counts every convolution, transposed convolution and head; ignores
    normalisation, activations and biases (under 2% here). A training step
    costs about 3x this per sample (forward, and backward w.r.t. inputs and
    weights).

    Args:
        config: ExperimentConfig.
        patch_size: (z, y, x) voxels, multiples of :func:`total_stride`.

    Example:
        >>> from kits_keras.config import get_config
        >>> f = count_flops(get_config("paper"), (48, 192, 192))
        >>> round(f / 1e12, 2)
        1.05
    """
    mc = config.model
    strides = strides_lib.model_strides(config)
    filters = level_filters(mc)
    step = total_stride(config)
    if any(p % s for p, s in zip(patch_size, step)):
        raise ValueError(
            f"patch_size must be a multiple of the total stride {step}. "
            f"Received: patch_size={tuple(patch_size)}"
        )
    shape = list(patch_size)
    voxels = []
    for stride in strides:
        shape = [d // s for d, s in zip(shape, stride)]
        voxels.append(shape[0] * shape[1] * shape[2])
    macs = 0
    channels = 1
    for level in range(mc.num_levels):
        macs += voxels[level] * 27 * channels * filters[level]
        macs += voxels[level] * 27 * filters[level] ** 2
        channels = filters[level]
    for level in range(mc.num_levels - 2, -1, -1):
        f = filters[level]
        # Transposed conv, kernel = stride: every output voxel gets one
        # kernel tap of every input channel.
        macs += voxels[level] * channels * f
        macs += voxels[level] * 27 * 2 * f * f  # conv1 on the concat
        macs += voxels[level] * 27 * f * f
        macs += voxels[level] * f * regions_lib.num_outputs(
            mc, config.data.label_set)
        channels = f
    return 2 * macs
