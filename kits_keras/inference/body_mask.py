"""Where the patient is: a body mask from the CT itself.

Kidneys and kidney tumours lie deep inside the body, never in the air
around it or in the CT table. Whatever the network says, voxels outside the
body are background (:func:`remove_outside_body`), and the prediction's JSON
says how much was removed.

The mask: voxels above ``threshold_hu`` (-500 HU: fat is about -100, air
-1000, lung about -850), on a grid of about ``step_mm`` (4 mm) so that the
834-slice cases stay cheap; the largest 3-D connected component (the table
is a separate component unless it touches the skin: it is only a few mm
thick, and one erosion separates it); holes filled slice by slice (lungs,
bowel gas and the kidney's own fat sinus are inside the body); one voxel
of dilation so that the coarse grid never cuts into the body. Arrays are
``(z, y, x)``, spacing in mm.

Example:
    >>> ct = np.full((20, 40, 40), -1000.0, np.float32)
    >>> ct[:, 10:30, 10:30] = 40.0                  # the body
    >>> ct[:, 18:22, 18:22] = -1000.0               # gas inside it
    >>> mask = body_mask(ct, (5.0, 4.0, 4.0))
    >>> bool(mask[10, 20, 20]), bool(mask[10, 2, 2])
    (True, False)
"""

import numpy as np
from scipy import ndimage

THRESHOLD_HU = -500.0
STEP_MM = 4.0


def _steps(spacing, step_mm):
    return tuple(max(1, int(round(step_mm / float(s)))) for s in spacing)


def coarse_body_mask(image, spacing, threshold_hu=THRESHOLD_HU,
                     step_mm=STEP_MM):
    """The body mask on a strided grid; see the module docstring.

    Returns:
        (mask, steps): boolean ``(z, y, x)`` array on the grid
        ``image[::steps[0], ::steps[1], ::steps[2]]``, and those steps.
    """
    steps = _steps(spacing, step_mm)
    coarse = np.asarray(image)[::steps[0], ::steps[1], ::steps[2]]
    dense = coarse > threshold_hu
    if not dense.any():
        return dense, steps
    # One erosion in plane detaches a thin table from the back.
    opened = ndimage.binary_erosion(dense, np.ones((1, 3, 3), bool))
    components, count = ndimage.label(opened)
    if count == 0:
        components, count = ndimage.label(dense)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    body = components == int(np.argmax(sizes))
    body = ndimage.binary_dilation(body, np.ones((1, 3, 3), bool)) & dense
    for z in range(body.shape[0]):
        body[z] = ndimage.binary_fill_holes(body[z])
    # Conservative: the coarse grid must not cut into the patient.
    body = ndimage.binary_dilation(body, np.ones((3, 3, 3), bool))
    return body, steps


def body_mask(image, spacing, threshold_hu=THRESHOLD_HU, step_mm=STEP_MM):
    """Boolean body mask on ``image``'s own grid (``(z, y, x)``, HU)."""
    coarse, steps = coarse_body_mask(image, spacing, threshold_hu, step_mm)
    index = [np.minimum(np.arange(n) // s, c - 1)
             for n, s, c in zip(np.shape(image), steps, coarse.shape)]
    return coarse[np.ix_(*index)]


def remove_outside_body(labels, image, spacing, num_classes=3,
                        slab_slices=64):
    """Sets every labelled voxel outside the body to background, in place.

    Args:
        labels: uint8 ``(z, y, x)`` label map on the CT's grid.
        image: the CT in HU, same grid.
        spacing: (z, y, x) mm.
        num_classes: labels are ``0 .. num_classes - 1``.
        slab_slices: slices expanded to full resolution at a time.

    Returns:
        dict ``{class index: voxels removed}`` for classes 1.. (0 if none).
    """
    coarse, steps = coarse_body_mask(image, spacing)
    yx = [np.minimum(np.arange(n) // s, c - 1)
          for n, s, c in zip(labels.shape[1:], steps[1:], coarse.shape[1:])]
    removed = np.zeros(num_classes, np.int64)
    for start in range(0, labels.shape[0], slab_slices):
        stop = min(start + slab_slices, labels.shape[0])
        zi = np.minimum(np.arange(start, stop) // steps[0],
                        coarse.shape[0] - 1)
        outside = ~coarse[np.ix_(zi, *yx)]
        slab = labels[start:stop]
        hit = outside & (slab > 0)
        if hit.any():
            removed += np.bincount(slab[hit], minlength=num_classes)[
                :num_classes]
            slab[hit] = 0
    return {int(c): int(removed[c]) for c in range(1, num_classes)}
