"""Reading one rotated, scaled, elastically deformed patch out of a volume.

The geometry and the sampling that
:func:`kits_keras.data.augment.spatial_transform` combines into ONE
resampling, as pure TensorFlow ops: the sampling coordinates of the output
patch only (patch grid about its centre, elastic displacement added, scaled
and rotated in mm so that rotations are true rotations on anisotropic
voxels, shifted to the patch centre in the volume), then trilinear (image) or nearest (labels) gathers from the whole
volume, reading only the box the coordinates touch; and the plain crop used
when no spatial transform is drawn.

Axis order everywhere is ``(z, y, x)``; spacings are in mm; displacements and
coordinates are in voxels of the volume.

Reference: batchgenerators ``SpatialTransform`` (nnU-Net v1; Isensee et al.,
Nature Methods 2021).
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
