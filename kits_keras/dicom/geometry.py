"""Placing the slices of one DICOM CT series on a grid, as dcm2niix does.

Slices are sorted by their position along the slice normal (the cross
product of the two ImageOrientationPatient directions), never by file name
or InstanceNumber; the slice spacing comes from those positions, never from
SliceThickness or SpacingBetweenSlices. Refused, with one line naming a file
(:class:`kits_keras.io.CaseError`): orientations that are not two orthogonal
unit vectors, a series of one slice, two slices at one position, missing
slices, a gantry tilt and irregular spacing. The affine is dcm2niix's (see
:mod:`kits_keras.dicom.read`), in RAS and mm.
"""

import numpy as np

from kits_keras import io

# Slice positions may be off the regular grid, and off the slice normal, by
# this share of the slice spacing (IPP values are often rounded to 0.01 mm:
# 0.8 % of a 0.625 mm spacing).
TOLERANCE = 0.05
# A gap this many spacings wide or wider means missing slices.
MISSING_GAP = 1.5


def header_floats(ds, key, count, path):
    """``count`` finite floats of header ``key`` (float64), or a CaseError."""
    try:
        values = [float(v) for v in ds[key].value]
    except (KeyError, TypeError, ValueError):
        raise io.CaseError(f"{path}: no usable {key}; cannot place the "
                           "slice") from None
    if len(values) != count or not np.all(np.isfinite(values)):
        raise io.CaseError(f"{path}: {key} {values} is not {count} finite "
                           "numbers")
    return np.asarray(values, np.float64)


def place_slices(slices):
    """Sorts ``slices`` along the normal and returns ``(slices, affine)``.

    ``slices`` hold ``path``, ``position`` (ImagePositionPatient, mm, LPS)
    and ``dataset`` (the header). The affine is dcm2niix's (module
    docstring), in RAS.
    """
    first = slices[0]
    along_row, along_col, normal = _directions(first)
    if len(slices) < 2:
        raise io.CaseError(f"{first.path}: the only slice of its series; a "
                           "volume needs at least 2")
    slices = sorted(slices, key=lambda s: float(s.position @ normal))
    depth = np.array([s.position @ normal for s in slices])
    steps = np.diff(depth)
    spacing = _check_steps(slices, steps)
    _check_tilt(slices, depth, normal, spacing)
    step = _regular_step(slices, depth, steps)
    rows = int(first.dataset.Rows)
    row_mm, col_mm = header_floats(first.dataset, "PixelSpacing", 2,
                                   first.path)
    lps = np.eye(4)
    lps[:3, 0] = along_row * col_mm
    lps[:3, 1] = -along_col * row_mm  # rows reversed, as dcm2niix
    lps[:3, 2] = normal * step
    lps[:3, 3] = slices[0].position + (rows - 1) * row_mm * along_col
    return slices, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _directions(first):
    """Row, column and unit normal directions (LPS) of the first slice."""
    iop = header_floats(first.dataset, "ImageOrientationPatient", 6,
                        first.path)
    along_row, along_col = iop[:3], iop[3:]
    if not (abs(np.linalg.norm(along_row) - 1) < 1e-2 and abs(
            np.linalg.norm(along_col) - 1) < 1e-2 and abs(
                along_row @ along_col) < 1e-2):
        raise io.CaseError(f"{first.path}: ImageOrientationPatient "
                           f"{iop.tolist()} is not two orthogonal unit "
                           "vectors")
    normal = np.cross(along_row, along_col)
    normal /= np.linalg.norm(normal)
    return along_row, along_col, normal


def _check_steps(slices, steps):
    """The median slice spacing (mm); refuses two slices at one position
    and gaps of :data:`MISSING_GAP` spacings or more (missing slices)."""
    for k, step in enumerate(steps):
        if step < 1e-3:
            raise io.CaseError(
                f"{slices[k + 1].path}: at the position of "
                f"{slices[k].path}: two acquisitions (or a mixed series) in "
                "one SeriesInstanceUID")
    spacing = float(np.median(steps))
    for k, step in enumerate(steps):
        if step >= MISSING_GAP * spacing:
            missing = int(round(step / spacing)) - 1
            raise io.CaseError(
                f"{slices[k + 1].path}: {step:g} mm from {slices[k].path}, "
                f"the series' spacing being {spacing:g} mm: about "
                f"{max(missing, 1)} missing slice(s)")
    return spacing


def _check_tilt(slices, depth, normal, spacing):
    """Refuses positions off the first slice's normal (gantry tilt)."""
    offsets = np.array([s.position - slices[0].position for s in slices])
    sideways = np.linalg.norm(
        offsets - np.outer(depth - depth[0], normal), axis=1)
    worst = int(np.argmax(sideways))
    if sideways[worst] > TOLERANCE * spacing:
        tilt = slices[worst].dataset.get("GantryDetectorTilt")
        tag = f", GantryDetectorTilt {tilt}" if tilt not in (None, "") else ""
        raise io.CaseError(
            f"{slices[worst].path}: {sideways[worst]:.2f} mm off the slice "
            f"normal of {slices[0].path}: gantry tilt{tag} (sheared "
            "volume); resample it to an orthogonal grid first")


def _regular_step(slices, depth, steps):
    """The grid's slice step (mm, first to last over n - 1); refuses a
    position off that regular grid (irregular spacing)."""
    step = (depth[-1] - depth[0]) / (len(slices) - 1)
    off_grid = np.abs(depth - depth[0] - step * np.arange(len(slices)))
    worst = int(np.argmax(off_grid))
    if off_grid[worst] > TOLERANCE * step:
        raise io.CaseError(
            f"{slices[worst].path}: {off_grid[worst]:.2f} mm off a regular "
            f"grid of {step:.3f} mm slices: irregular slice spacing "
            f"(steps {steps.min():g} to {steps.max():g} mm)")
    return step
