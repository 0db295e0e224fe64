"""3-D training augmentation as pure TensorFlow ops on one volume.

Rotation, scaling and elastic deformation are ONE resampling: the sampling
coordinates of the output patch only are computed (patch grid about its
centre, elastic displacement added, scaled and rotated in mm so that rotations
are true rotations on anisotropic voxels, shifted to the patch centre in the
volume), and the image (trilinear) and labels (nearest) are read FROM THE
WHOLE VOLUME with gathers. A rotated patch therefore has real anatomy in its
corners instead of padding, and no intermediate volume is ever resampled
(the coordinates and gathers: :mod:`kits_keras.data.resample_patch`).
Gamma correction (statistics retained), brightness, contrast, Gaussian noise,
Gaussian blur, simulated low resolution and mirroring follow on the patch.
Before them, a label-aware change that is not nnU-Net's can move the
tumour's intensities towards the kidney's (:func:`tumour_contrast`).

Everything is TF graph ops (no ``py_function``, no Python per voxel) so it
runs in ``tf.data`` threads; randomness comes from stateless ops seeded with a
``(2,)`` int64 seed, so a seed gives the same patch in eager mode, inside
``Dataset.map`` and on any machine.

Axis order everywhere is ``(z, y, x)``; spacings are in mm; displacements and
coordinates are in voxels of the volume.

Reference: nnU-Net v1 / batchgenerators ``SpatialTransform``,
``GammaTransform``, ``BrightnessMultiplicativeTransform``,
``ContrastAugmentationTransform``, ``GaussianNoiseTransform``,
``GaussianBlurTransform``, ``SimulateLowResolutionTransform``,
``MirrorTransform`` (Isensee et al., Nature Methods 2021).
"""

import math

from kits_keras.backend import import_tensorflow
from kits_keras.data.resample_patch import crop
from kits_keras.data.resample_patch import elastic_control_points
from kits_keras.data.resample_patch import interpolate_linear
from kits_keras.data.resample_patch import interpolate_nearest
from kits_keras.data.resample_patch import sampling_coordinates

tf = import_tensorflow()


def split_seed(seed, num):
    """``num`` independent ``(2,)`` int64 seeds derived from ``seed``."""
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    return tf.random.experimental.stateless_split(seed, num)


def sample_params(config, seed):
    """Draws one patch's augmentation parameters.

    Args:
        config: AugmentConfig.
        seed: int64 tensor (2,).

    Returns:
        dict of tensors: ``angles`` (3,) radians about the (z, y, x) axes,
        ``scale`` scalar zoom (coordinates are multiplied by it: > 1 shows
        more anatomy, smaller), ``elastic`` bool, ``alpha``, ``sigma``,
        ``elastic_seed`` (2,), ``gamma`` scalar (1 = none), ``mirror`` bool
        (3,).
    """
    seeds = split_seed(seed, 8)
    u = tf.random.stateless_uniform([8], seeds[0])
    max_angles = tf.constant(
        [math.radians(a) for a in config.rotation_degrees], tf.float32
    )
    angles = tf.random.stateless_uniform([3], seeds[1], -1.0, 1.0) * max_angles
    angles = tf.where(u[0] < config.p_rotation, angles, tf.zeros_like(angles))
    lo, hi = config.scale_range
    scale = tf.random.stateless_uniform([], seeds[2], lo, hi)
    scale = tf.where(u[1] < config.p_scale, scale, 1.0)
    alpha = tf.random.stateless_uniform([], seeds[3], *config.elastic_alpha)
    sigma = tf.random.stateless_uniform([], seeds[4], *config.elastic_sigma)
    # nnU-Net's draw: half the time a gamma below 1, else above 1.
    g_lo, g_hi = config.gamma_range
    low = tf.random.stateless_uniform([], seeds[5], g_lo, min(g_hi, 1.0))
    high = tf.random.stateless_uniform([], seeds[6], max(g_lo, 1.0), g_hi)
    gamma = tf.where(u[2] < 0.5, low, high) if g_lo < 1.0 else high
    gamma = tf.where(u[3] < config.p_gamma, gamma, 1.0)
    mirror = u[4:7] < tf.constant(config.p_mirror, tf.float32)
    return {
        "angles": angles,
        "scale": scale,
        "elastic": u[7] < config.p_elastic,
        "alpha": alpha,
        "sigma": sigma,
        "elastic_seed": seeds[7],
        "gamma": gamma,
        "mirror": mirror,
    }


def sample_intensity_params(config, seed):
    """Draws one patch's intensity augmentation parameters.

    Drawn from a seed folded off ``seed`` so that adding them left the
    spatial, gamma and mirror draws of :func:`sample_params` unchanged.

    Args:
        config: AugmentConfig.
        seed: int64 tensor (2,).

    Returns:
        dict of float32 scalars: ``brightness`` (multiplier, 1 = none),
        ``contrast`` (factor about the mean, 1 = none), ``noise_std``
        (0 = none).
    """
    seeds = split_seed(tf.random.experimental.stateless_fold_in(
        tf.cast(seed, tf.int64), 1), 4)
    u = tf.random.stateless_uniform([3], seeds[0])
    brightness = tf.random.stateless_uniform([], seeds[1],
                                             *config.brightness_range)
    contrast = tf.random.stateless_uniform([], seeds[2],
                                           *config.contrast_range)
    variance = tf.random.stateless_uniform([], seeds[3],
                                           *config.noise_variance)
    return {
        "brightness": tf.where(u[0] < config.p_brightness, brightness, 1.0),
        "contrast": tf.where(u[1] < config.p_contrast, contrast, 1.0),
        "noise_std": tf.where(u[2] < config.p_noise, tf.sqrt(variance), 0.0),
    }


def intensity_transform(image, params, seed):
    """Brightness, then contrast, then Gaussian noise, as nnU-Net orders them.

    Contrast scales about the patch mean and clips to the patch's range
    before the scaling (batchgenerators' ``preserve_range``), so it never
    invents intensities brighter than bone or darker than air.

    Args:
        image: float32 (z, y, x) normalised patch.
        params: dict from :func:`sample_intensity_params`.
        seed: int64 (2,) seed of the noise field.

    Returns:
        float32 tensor of ``image``'s shape.

    >>> import numpy as np
    >>> x = tf.constant(np.linspace(-1.0, 1.0, 8, dtype="float32"))
    >>> p = {"brightness": 2.0, "contrast": 1.0, "noise_std": 0.0}
    >>> np.round(intensity_transform(x, p, [0, 0]).numpy()[[0, -1]], 3)
    array([-2.,  2.], dtype=float32)
    >>> p = {"brightness": 1.0, "contrast": 2.0, "noise_std": 0.0}
    >>> y = intensity_transform(x, p, [0, 0]).numpy()
    >>> float(y.min()), float(y.max()), round(float(y.mean()), 6)
    (-1.0, 1.0, 0.0)
    """
    def contrast(x):
        mean = tf.reduce_mean(x)
        return tf.clip_by_value((x - mean) * params["contrast"] + mean,
                                tf.reduce_min(x), tf.reduce_max(x))

    def noise(x):
        return x + tf.random.stateless_normal(tf.shape(x), seed) * params[
            "noise_std"]

    # Each step only when drawn: an undrawn one leaves the patch bit-exact
    # (and the noise field is not paid for).
    image = image * params["brightness"]
    image = tf.cond(params["contrast"] != 1.0, lambda: contrast(image),
                    lambda: image)
    return tf.cond(params["noise_std"] > 0.0, lambda: noise(image),
                   lambda: image)


def sample_resolution_params(config, seed):
    """Draws one patch's blur and low-resolution parameters.

    From a seed folded off ``seed`` (as :func:`sample_intensity_params`),
    so adding them left every other draw unchanged.

    Args:
        config: AugmentConfig.
        seed: int64 tensor (2,).

    Returns:
        dict: ``blur_sigma`` float32 (3,) voxels along (z, y, x), zeros =
        none; ``zoom`` float32 scalar, 1 = none.
    """
    seeds = split_seed(tf.random.experimental.stateless_fold_in(
        tf.cast(seed, tf.int64), 3), 3)
    u = tf.random.stateless_uniform([2], seeds[0])
    sigma = tf.random.stateless_uniform([3], seeds[1], *config.blur_sigma)
    zoom = tf.random.stateless_uniform([], seeds[2],
                                       *config.low_resolution_zoom)
    return {
        "blur_sigma": tf.where(u[0] < config.p_blur, sigma,
                               tf.zeros_like(sigma)),
        "zoom": tf.where(u[1] < config.p_low_resolution, zoom, 1.0),
    }


BLUR_RADIUS = 3  # voxels: 3 sigma of the widest blur_sigma nnU-Net draws


def gaussian_blur(image, sigma):
    """Separable Gaussian blur of a (z, y, x) patch, reflecting at its
    faces (scipy's ``gaussian_filter`` default); ``sigma`` (3,) voxels,
    truncated at :data:`BLUR_RADIUS` voxels.

    >>> import numpy as np
    >>> x = np.zeros((7, 7, 7), np.float32); x[3, 3, 3] = 1.0
    >>> y = gaussian_blur(tf.constant(x), tf.constant([1.0, 1.0, 1.0]))
    >>> round(float(tf.reduce_sum(y)), 4), bool(y[3, 3, 3] < 0.07)
    (1.0, True)
    """
    offsets = tf.range(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=tf.float32)
    out = image[None, ..., None]
    for axis in range(3):
        s = tf.maximum(sigma[axis], 1e-3)
        kernel = tf.exp(-0.5 * tf.square(offsets / s))
        kernel = kernel / tf.reduce_sum(kernel)
        shape = [1, 1, 1, 1, 1]
        shape[axis] = 2 * BLUR_RADIUS + 1
        pad = [[0, 0]] * 5
        pad[axis + 1] = [BLUR_RADIUS, BLUR_RADIUS]
        out = tf.nn.conv3d(tf.pad(out, pad, mode="SYMMETRIC"),
                           tf.reshape(kernel, shape), [1] * 5, "VALID")
    return out[0, ..., 0]


def simulate_low_resolution(image, zoom):
    """nnU-Net's simulated low resolution: nearest subsampling to ``zoom``
    times the voxels per axis, then interpolation back to the patch shape
    (bicubic in-plane, then linear along z).

    >>> import numpy as np
    >>> x = tf.constant(np.arange(4 * 8 * 8, dtype=np.float32).reshape(
    ...     4, 8, 8))
    >>> y = simulate_low_resolution(x, tf.constant(0.5))
    >>> y.shape, bool(tf.reduce_any(y != x))
    (TensorShape([4, 8, 8]), True)
    """
    shape = tf.shape(image)
    small = tf.maximum(tf.cast(tf.round(tf.cast(shape, tf.float32) * zoom),
                               tf.int32), 1)
    out = image
    for axis in range(3):
        # Centre of each coarse voxel, rounded down: nearest neighbour.
        index = tf.cast((tf.range(small[axis], dtype=tf.float32) + 0.5)
                        * tf.cast(shape[axis], tf.float32)
                        / tf.cast(small[axis], tf.float32), tf.int32)
        out = tf.gather(out, tf.minimum(index, shape[axis] - 1), axis=axis)
    # (z', y', x') -> (z', y, x): each slice as a 2-D image.
    out = tf.image.resize(out[..., None], shape[1:], method="bicubic")
    # (y, z', x) -> (y, z, x): linear across slices.
    out = tf.image.resize(tf.transpose(out, [1, 0, 2, 3]),
                          tf.stack([shape[0], shape[2]]), method="bilinear")
    return tf.transpose(out, [1, 0, 2, 3])[..., 0]


def spatial_transform(image, labels, spacing, start, patch_size, params,
                      max_displacement, fill):
    """One resampling of image and labels for rotation, scale and elastic.

    ``start`` is the patch's corner in the volume for the identity
    transform; the transforms act about the patch centre. Returns
    (image float32, labels of ``labels.dtype``) of shape ``patch_size``.
    """
    centre = tf.cast(start, tf.float32) + tf.constant(
        [(n - 1) / 2.0 for n in patch_size]
    )
    def coordinates(elastic):
        control_points = None
        if elastic:
            control_points = elastic_control_points(
                patch_size, params["alpha"], params["sigma"],
                max_displacement, params["elastic_seed"],
            )
        return sampling_coordinates(
            patch_size, centre, spacing, params["angles"], params["scale"],
            control_points,
        )

    coords = tf.cond(
        params["elastic"], lambda: coordinates(True),
        lambda: coordinates(False),
    )
    out_image = interpolate_linear(image, coords, fill)
    out_labels = interpolate_nearest(labels, coords, tf.zeros([], labels.dtype))
    return out_image, out_labels


def sample_tumour_contrast(config, seed):
    """Draws one patch's tumour contrast change: a float32 scalar, the
    fraction of the kidney-tumour difference of means to remove (0 =
    none). From its own folded seed, as :func:`sample_intensity_params`."""
    seeds = split_seed(tf.random.experimental.stateless_fold_in(
        tf.cast(seed, tf.int64), 4), 2)
    u = tf.random.stateless_uniform([], seeds[0])
    fraction = tf.random.stateless_uniform([], seeds[1],
                                           *config.tumour_contrast_range)
    return tf.where(u < config.p_tumour_contrast, fraction, 0.0)


def tumour_contrast(image, labels, fraction):
    """Moves the tumour's intensities towards the kidney's.

    Adds ``fraction * (mean kidney - mean tumour)`` to the tumour, through
    a soft mask: the tumour mask blurred by a one-voxel Gaussian, doubled
    and capped at 1, so the whole tumour moves (small ones too) and the
    change fades over the voxel or two around it instead of making an edge
    of its own. The tumour keeps its texture. A patch without
    kidney (label 1) or tumour (label 2) is returned as it is.

    Args:
        image: float32 (z, y, x) patch.
        labels: integer (z, y, x) patch.
        fraction: float32 scalar; 1 makes the means equal, negative values
            widen the difference.

    Returns:
        float32 tensor of ``image``'s shape.

    >>> import numpy as np
    >>> labels = np.zeros((8, 8, 8), "int32")
    >>> labels[:, :, :4], labels[2:6, 2:6, 5:8] = 1, 2
    >>> image = np.where(labels == 1, 2.0, np.where(labels == 2, -1.0, 0.0))
    >>> out = tumour_contrast(tf.constant(image, tf.float32), labels, 0.5)
    >>> out = out.numpy()
    >>> round(float(out[3, 3, 6]), 2), round(float(out[0, 0, 0]), 2)
    (0.5, 2.0)
    """
    def shifted():
        kidney = tf.cast(tf.equal(labels, 1), tf.float32)
        tumour = tf.cast(tf.equal(labels, 2), tf.float32)
        kidney_voxels = tf.reduce_sum(kidney)
        tumour_voxels = tf.reduce_sum(tumour)
        difference = (tf.math.divide_no_nan(tf.reduce_sum(image * kidney),
                                            kidney_voxels)
                      - tf.math.divide_no_nan(tf.reduce_sum(image * tumour),
                                              tumour_voxels))
        both = tf.cast((kidney_voxels > 0.0) & (tumour_voxels > 0.0),
                       tf.float32)
        soft = tf.minimum(2.0 * gaussian_blur(tumour, tf.ones([3])), 1.0)
        return image + both * fraction * difference * soft

    # Undrawn (the default): nothing computed, the patch bit-exact.
    return tf.cond(fraction != 0.0, shifted, lambda: image)


def gamma_correction(image, gamma):
    """nnU-Net's gamma: on [0, 1]-rescaled intensities, mean/std retained."""
    mean, std = tf.reduce_mean(image), tf.math.reduce_std(image)
    low, high = tf.reduce_min(image), tf.reduce_max(image)
    span = tf.maximum(high - low, 1e-7)
    out = tf.pow((image - low) / span, gamma) * span + low
    out_mean, out_std = tf.reduce_mean(out), tf.math.reduce_std(out)
    return (out - out_mean) / (out_std + 1e-8) * std + mean


def mirror(volume, flags):
    """Reverses ``volume`` along each axis whose flag (bool (3,)) is set."""
    for axis in range(3):
        volume = tf.cond(
            flags[axis],
            lambda v=volume, a=axis: tf.reverse(v, [a]),
            lambda v=volume: v,
        )
    return volume


def augment_patch(image, labels, spacing, start, patch_size, config, seed,
                  fill):
    """Cuts one augmented patch out of a whole volume.

    Args:
        image: float16 or float32 (z, y, x) normalised volume.
        labels: integer (z, y, x) volume with values in {0, 1, 2}.
        spacing: float (3,) mm.
        start: int (3,) corner of the un-augmented patch (may lie outside the
            volume; outside reads ``fill`` / 0).
        patch_size: (3,) ints.
        config: AugmentConfig.
        seed: int64 (2,).
        fill: scalar image value outside the volume.

    Returns:
        (image float32, labels int32), each of shape ``patch_size``. With no
        spatial transform drawn, the patch is a plain crop (no resampling).
    """
    params = sample_params(config, seed)
    # The image stays in its dtype (float16 from TFDS halves the memory the
    # gathers read); interpolation and the output are float32.
    fill = tf.cast(fill, image.dtype)
    is_spatial = (
        tf.reduce_any(params["angles"] != 0.0)
        | (params["scale"] != 1.0)
        | params["elastic"]
    )
    out_image, out_labels = tf.cond(
        is_spatial,
        lambda: spatial_transform(
            image, labels, spacing, start, patch_size, params,
            config.elastic_max_displacement, fill,
        ),
        lambda: (
            tf.cast(crop(image, start, patch_size, fill), tf.float32),
            crop(labels, start, patch_size, tf.zeros([], labels.dtype)),
        ),
    )
    out_image = tumour_contrast(out_image, out_labels,
                                sample_tumour_contrast(config, seed))
    out_image = tf.cond(
        params["gamma"] != 1.0,
        lambda: gamma_correction(out_image, params["gamma"]),
        lambda: out_image,
    )
    intensity = sample_intensity_params(config, seed)
    out_image = intensity_transform(
        out_image, intensity,
        tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), 2))
    resolution = sample_resolution_params(config, seed)
    out_image = tf.cond(
        tf.reduce_any(resolution["blur_sigma"] > 0.0),
        lambda: gaussian_blur(out_image, resolution["blur_sigma"]),
        lambda: out_image,
    )
    out_image = tf.cond(
        resolution["zoom"] != 1.0,
        lambda: simulate_low_resolution(out_image, resolution["zoom"]),
        lambda: out_image,
    )
    out_image = mirror(out_image, params["mirror"])
    out_labels = tf.cast(mirror(out_labels, params["mirror"]), tf.int32)
    return (
        tf.ensure_shape(out_image, patch_size),
        tf.ensure_shape(out_labels, patch_size),
    )
