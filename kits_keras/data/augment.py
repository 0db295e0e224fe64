"""3-D training augmentation as pure TensorFlow ops on one volume.

Rotation, scaling and elastic deformation are ONE resampling: the sampling
coordinates of the output patch only are computed (patch grid about its
centre, elastic displacement added, scaled and rotated in mm so that rotations
are true rotations on anisotropic voxels, shifted to the patch centre in the
volume), and the image (trilinear) and labels (nearest) are read FROM THE
WHOLE VOLUME with gathers. A rotated patch therefore has real anatomy in its
corners instead of padding, and no intermediate volume is ever resampled.
Gamma correction (statistics retained), brightness, contrast, Gaussian noise
and mirroring follow on the patch.

Everything is TF graph ops (no ``py_function``, no Python per voxel) so it
runs in ``tf.data`` threads; randomness comes from stateless ops seeded with a
``(2,)`` int64 seed, so a seed gives the same patch in eager mode, inside
``Dataset.map`` and on any machine.

Axis order everywhere is ``(z, y, x)``; spacings are in mm; displacements and
coordinates are in voxels of the volume.

Reference: nnU-Net v1 / batchgenerators ``SpatialTransform``,
``GammaTransform``, ``BrightnessMultiplicativeTransform``,
``ContrastAugmentationTransform``, ``GaussianNoiseTransform``,
``MirrorTransform`` (Isensee et al., Nature Methods 2021).
"""

import math

from kits_keras.backend import import_tensorflow

tf = import_tensorflow()

# Std of batchgenerators' elastic field per unit alpha: U(-1, 1) noise
# (std 1/sqrt(3)) smoothed by a 3-D Gaussian of width sigma keeps
# 1 / (2 sqrt(pi) sigma)^(3/2) of its std. We draw our coarse control points
# with this std so ``elastic_alpha`` / ``elastic_sigma`` mean what they mean in
# nnU-Net's configuration.
_ELASTIC_STD_PER_ALPHA = 1.0 / math.sqrt(3.0)


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


def rotation_matrix(angles):
    """3x3 rotation acting on (z, y, x) vectors, angles about z, y, x.

    A positive angle about z turns the axial plane like ``np.rot90(a, 1,
    axes=(1, 2))`` (for the image content).
    """
    c, s = tf.cos(angles), tf.sin(angles)
    one, zero = tf.ones([]), tf.zeros([])
    about_z = tf.stack([
        [one, zero, zero], [zero, c[0], s[0]], [zero, -s[0], c[0]]
    ])
    about_y = tf.stack([
        [c[1], zero, -s[1]], [zero, one, zero], [s[1], zero, c[1]]
    ])
    about_x = tf.stack([
        [c[2], s[2], zero], [-s[2], c[2], zero], [zero, zero, one]
    ])
    return about_z @ about_y @ about_x


def elastic_control_points(patch_size, alpha, sigma, max_displacement,
                           seed):
    """Coarse random displacements (cz, cy, cx, 3), in voxels.

    Normal control points every ``sigma`` voxels with the std of
    batchgenerators' field for the same ``alpha`` and ``sigma``; each vector
    is shortened to at most ``max_displacement`` voxels.
    """
    sigma = tf.maximum(tf.cast(sigma, tf.float32), 1.0)
    coarse = [
        tf.cast(tf.math.ceil(n / sigma), tf.int32) + 2 for n in patch_size
    ]
    std = alpha * _ELASTIC_STD_PER_ALPHA / (
        2.0 * math.sqrt(math.pi) * sigma
    ) ** 1.5
    field = tf.random.stateless_normal(tf.stack(coarse + [3]), seed) * std
    length = tf.norm(field, axis=-1, keepdims=True)
    return field * tf.minimum(
        1.0, max_displacement / tf.maximum(length, 1e-6)
    )


def upsample_field(field, patch_size):
    """Trilinear upsampling of a coarse (cz, cy, cx, C) field to the patch.

    Every output vector is a convex combination of control points, so the
    bound on their length holds for the whole field.
    """
    nz, ny, nx = patch_size
    field = tf.image.resize(field, [ny, nx], method="bilinear")  # y, x
    field = tf.transpose(field, [1, 0, 2, 3])  # (y, cz, x, C)
    field = tf.image.resize(field, [nz, nx], method="bilinear")  # z
    return tf.transpose(field, [1, 0, 2, 3])


def elastic_displacement(patch_size, alpha, sigma, max_displacement, seed):
    """Smooth random displacement field (z, y, x, 3) in voxels, each vector
    at most ``max_displacement`` long."""
    return upsample_field(
        elastic_control_points(
            patch_size, alpha, sigma, max_displacement, seed
        ),
        patch_size,
    )


def patch_matrix(spacing, angles, scale):
    """3x3 map from patch voxel offsets to volume voxel offsets.

    Offsets go to mm, are rotated and scaled there (so a rotation is a
    rotation on anisotropic voxels), and come back to voxels.
    """
    spacing = tf.cast(spacing, tf.float32)
    return (
        rotation_matrix(angles) * scale
        * spacing[None, :] / spacing[:, None]
    )


def sampling_coordinates(patch_size, centre, spacing, angles, scale,
                         control_points=None):
    """Volume voxel coordinates (3 tensors (z, y, x)) of the patch voxels.

    Args:
        patch_size: (3,) ints, output patch shape.
        centre: float (3,) voxel coordinate of the patch centre in the volume.
        spacing: float (3,) mm of the volume's voxels.
        angles: (3,) radians about z, y, x; scale: scalar zoom.
        control_points: optional coarse elastic displacement (cz, cy, cx, 3)
            in patch voxels, added on the patch grid before rotation and
            scaling (as batchgenerators does). The map is linear, so it is
            applied to the control points before upsampling (3x cheaper).
    """
    matrix = patch_matrix(spacing, angles, scale)
    grid = [
        tf.range(n, dtype=tf.float32) - (n - 1) / 2.0 for n in patch_size
    ]
    shapes = ([-1, 1, 1], [1, -1, 1], [1, 1, -1])
    centre = tf.cast(centre, tf.float32)
    coords = [
        centre[k] + sum(
            tf.reshape(matrix[k, j] * grid[j], shapes[j]) for j in range(3)
        )
        for k in range(3)
    ]
    if control_points is not None:
        moved = tf.tensordot(control_points, tf.transpose(matrix), axes=1)
        field = upsample_field(moved, patch_size)
        coords = [coords[k] + field[..., k] for k in range(3)]
    return coords


def _bounding_box(coords, shape, margin):
    """[lo, hi) per axis of the volume voxels the coordinates touch."""
    lo, hi = [], []
    for k in range(3):
        lo.append(tf.clip_by_value(
            tf.cast(tf.floor(tf.reduce_min(coords[k])), tf.int32), 0, shape[k]
        ))
        hi.append(tf.clip_by_value(
            tf.cast(tf.floor(tf.reduce_max(coords[k])), tf.int32) + margin,
            lo[k], shape[k],
        ))
    return tf.stack(lo), tf.stack(hi)


def _local(volume, coords, fill, margin):
    """Crops the touched box, pads it by one ``fill`` voxel, shifts coords.

    Coordinates are clipped to the padding, so anything outside the volume
    reads ``fill``.
    """
    shape = tf.shape(volume)
    lo, hi = _bounding_box(coords, shape, margin)
    sub = tf.pad(
        tf.slice(volume, lo, hi - lo), [[1, 1]] * 3, constant_values=fill
    )
    size = tf.cast(hi - lo, tf.float32)
    local = [
        tf.clip_by_value(coords[k] - tf.cast(lo[k], tf.float32), -1.0,
                         size[k]) + 1.0
        for k in range(3)
    ]
    return sub, local


def interpolate_linear(volume, coords, fill):
    """Trilinear samples of ``volume`` at ``coords``; ``fill`` outside."""
    sub, (z, y, x) = _local(volume, coords, fill, margin=2)
    shape = tf.shape(sub)
    sy, sx = shape[1], shape[2]
    flat = tf.reshape(sub, [-1])
    z0, y0, x0 = [
        tf.minimum(tf.floor(c), tf.cast(n - 2, tf.float32))
        for c, n in zip((z, y, x), (shape[0], sy, sx))
    ]
    fz, fy, fx = z - z0, y - y0, x - x0
    base = (tf.cast(z0, tf.int32) * sy + tf.cast(y0, tf.int32)) * sx
    base = base + tf.cast(x0, tf.int32)

    def gather(index):
        return tf.cast(tf.gather(flat, index), tf.float32)

    def lerp_x(offset):
        a = gather(base + offset)
        b = gather(base + offset + 1)
        return a + fx * (b - a)

    def lerp_y(offset):
        a = lerp_x(offset)
        return a + fy * (lerp_x(offset + sx) - a)

    a = lerp_y(0)
    return a + fz * (lerp_y(sy * sx) - a)


def interpolate_nearest(volume, coords, fill):
    """Nearest-neighbour samples (labels); ``fill`` outside the volume."""
    rounded = [tf.round(c) for c in coords]
    sub, (z, y, x) = _local(volume, rounded, fill, margin=1)
    shape = tf.shape(sub)
    index = (tf.cast(z, tf.int32) * shape[1] + tf.cast(y, tf.int32))
    index = index * shape[2] + tf.cast(x, tf.int32)
    return tf.gather(tf.reshape(sub, [-1]), index)


def crop(volume, start, patch_size, fill):
    """``volume[start:start + patch_size]`` padded with ``fill`` outside."""
    start = tf.cast(start, tf.int32)
    size = tf.constant(patch_size, tf.int32)
    shape = tf.shape(volume)
    lo = tf.clip_by_value(start, 0, shape)
    hi = tf.clip_by_value(start + size, lo, shape)
    before = tf.clip_by_value(-start, 0, size)
    after = size - before - (hi - lo)
    out = tf.pad(
        tf.slice(volume, lo, hi - lo), tf.stack([before, after], axis=1),
        constant_values=fill,
    )
    return tf.ensure_shape(out, patch_size)


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
    out_image = tf.cond(
        params["gamma"] != 1.0,
        lambda: gamma_correction(out_image, params["gamma"]),
        lambda: out_image,
    )
    intensity = sample_intensity_params(config, seed)
    out_image = intensity_transform(
        out_image, intensity,
        tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), 2))
    out_image = mirror(out_image, params["mirror"])
    out_labels = tf.cast(mirror(out_labels, params["mirror"]), tf.int32)
    return (
        tf.ensure_shape(out_image, patch_size),
        tf.ensure_shape(out_labels, patch_size),
    )
