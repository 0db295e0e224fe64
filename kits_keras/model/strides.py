"""The U-Net's strides per level, from the patch size and the voxel spacing.

Axis order ``(z, y, x)``; spacings in mm.
"""


def derive_strides(patch_size, spacing, num_levels):
    """Per-level strides ``(z, y, x)`` as nnU-Net derives them.

    An axis is halved at a level only if its voxel size is at most twice the
    finest current voxel size (so anisotropic axes wait until the in-plane
    ones catch up) and the patch still has at least 8 voxels along it. The
    first level has stride 1 everywhere.

    Example:
        >>> derive_strides((48, 192, 192), (3.0, 0.78, 0.78), 5)
        ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    """
    size = [float(s) for s in patch_size]
    current = [float(s) for s in spacing]
    strides = [(1, 1, 1)]
    for _ in range(num_levels - 1):
        finest = min(current)
        stride = []
        for axis in range(3):
            ok = current[axis] <= 2 * finest and size[axis] >= 8
            stride.append(2 if ok else 1)
        for axis in range(3):
            if stride[axis] == 2:
                size[axis] /= 2
                current[axis] *= 2
        strides.append(tuple(stride))
    return tuple(strides)


def model_strides(config):
    """The strides of ``config.model``, derived when not given."""
    if config.model.strides:
        return tuple(tuple(s) for s in config.model.strides)
    return derive_strides(
        config.data.patch_size, config.data.target_spacing,
        config.model.num_levels,
    )


def output_strides(config):
    """Cumulative downsampling factor of each decoder output, full res first.

    The label pyramid for multi-scale supervision takes every
    ``factor``-th voxel of the full-resolution labels along each axis.
    """
    strides = model_strides(config)
    factors = []
    total = (1, 1, 1)
    for stride in strides[:-1]:
        total = tuple(t * s for t, s in zip(total, stride))
        factors.append(total)
    return tuple(factors)
