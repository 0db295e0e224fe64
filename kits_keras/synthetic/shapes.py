"""Geometry helpers for :mod:`cases` (synthetic CT): smooth blobs on a grid.

Shapes live in a patient frame measured in mm: ``s`` towards the head
(superior), ``p`` towards the back (posterior), ``l`` towards the patient's
left. With the KiTS19 affine (every axis flipped) voxel axis 0 runs from head
to feet, axis 1 from front to back and axis 2 from the patient's right to
left, so ``p`` and ``l`` grow with the voxel index and ``s`` shrinks.

Every shape is evaluated only inside its bounding box, so painting an organ
costs its own size, not the volume's: "full" cases of 512 x 512 x 300 voxels
stay quick.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Grid:
    """Voxel grid ``(z, y, x)`` with the patient frame's origin.

    Attributes:
        shape: tuple of 3 ints, ``(z, y, x)``.
        spacing: tuple of 3 floats, mm, ``(z, y, x)``.
        origin: tuple of 3 floats. Voxel index (may be fractional) of the
            frame origin: the centre of the spine at kidney level.
    """

    shape: tuple
    spacing: tuple
    origin: tuple

    def to_frame(self, index):
        """Voxel index ``(i, j, k)`` -> frame ``(s, p, l)`` in mm."""
        i, j, k = (np.asarray(v, np.float64) for v in index)
        sz, sy, sx = self.spacing
        i0, j0, k0 = self.origin
        return (i0 - i) * sz, (j - j0) * sy, (k - k0) * sx

    def to_index(self, point):
        """Frame ``(s, p, l)`` in mm -> fractional voxel index."""
        s, p, l = point
        sz, sy, sx = self.spacing
        i0, j0, k0 = self.origin
        return i0 - s / sz, j0 + p / sy, k0 + l / sx

    def box(self, centre, half_extent):
        """Slices of the voxels within ``half_extent`` mm of ``centre``.

        Returns None when the box misses the grid.
        """
        index = self.to_index(centre)
        out = []
        for c, h, sp, n in zip(index, half_extent, self.spacing, self.shape):
            lo = max(int(np.floor(c - h / sp)), 0)
            hi = min(int(np.ceil(c + h / sp)) + 1, n)
            if hi <= lo:
                return None
            out.append(slice(lo, hi))
        return tuple(out)

    def coords(self, box=None):
        """Open-grid frame coordinates ``(s, p, l)`` (float32) of a box."""
        box = box or tuple(slice(0, n) for n in self.shape)
        axes = [np.arange(b.start, b.stop) for b in box]
        s, p, l = self.to_frame(axes)
        return (
            s.astype(np.float32)[:, None, None],
            p.astype(np.float32)[None, :, None],
            l.astype(np.float32)[None, None, :],
        )


def rotation(rng=None, angles=(0.0, 0.0, 0.0)):
    """3x3 rotation (frame -> shape axes) from angles about s, p, l (rad)."""
    if rng is not None:
        angles = rng.uniform(-np.pi, np.pi, 3)
    a, b, c = angles
    rs = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)],
                   [0, np.sin(a), np.cos(a)]])
    rp = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0],
                   [-np.sin(b), 0, np.cos(b)]])
    rl = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0],
                   [0, 0, 1]])
    return rs @ rp @ rl


@dataclasses.dataclass(frozen=True)
class Blob:
    """A smoothly deformed ellipsoid.

    Attributes:
        centre: (s, p, l) mm.
        radii: (rs, rp, rl) mm along the shape's own axes.
        rot: 3x3 rotation, frame -> shape axes.
        bumps: tuple of (amplitude, direction (3,), phase): the surface
            radius is scaled by ``1 + sum(a * cos(f . n + phase))`` where
            ``n`` is the unit direction from the centre, so the surface stays
            smooth (organ-like) for any amplitude below ~0.3.
    """

    centre: tuple
    radii: tuple
    rot: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    bumps: tuple = ()

    def half_extent(self):
        """Half-size (mm) of the axis-aligned box holding the blob."""
        grow = 1.0 + sum(abs(a) for a, _, _ in self.bumps)
        rot = np.asarray(self.rot, np.float64)
        radii = np.asarray(self.radii, np.float64)[:, None]
        # Exact for a rotated ellipsoid: norm of each frame axis' column.
        half = np.sqrt(((rot * radii) ** 2).sum(axis=0))
        return tuple(half * grow + 1.0)


def random_bumps(rng, count=3, amplitude=0.12, frequency=2.5):
    """Low-order shape deformations for :class:`Blob`."""
    out = []
    for _ in range(count):
        direction = rng.normal(size=3)
        direction *= frequency / np.linalg.norm(direction)
        out.append((float(rng.uniform(0.3, 1.0) * amplitude), direction,
                    float(rng.uniform(0, 2 * np.pi))))
    return tuple(out)


def blob_field(grid, blob):
    """Evaluates a blob on its bounding box.

    Returns:
        (box, d, u) or None when the blob misses the grid. ``d`` (float32,
        box shape) is the normalised radius, < 1 inside; ``u`` is the tuple
        of the three shape-axis coordinates divided by the radii.
    """
    box = grid.box(blob.centre, blob.half_extent())
    if box is None:
        return None
    d, u = blob_distance(grid, blob, box)
    return box, d, u


def blob_distance(grid, blob, box):
    """Normalised radius (< 1 inside) and shape coordinates on ``box``."""
    s, p, l = grid.coords(box)
    rel = (s - blob.centre[0], p - blob.centre[1], l - blob.centre[2])
    rot = np.asarray(blob.rot, np.float32)
    u = tuple(
        (rot[r, 0] * rel[0] + rot[r, 1] * rel[1] + rot[r, 2] * rel[2])
        / np.float32(blob.radii[r])
        for r in range(3)
    )
    radius = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
    if blob.bumps:
        inv = 1.0 / np.maximum(radius, 1e-6)
        scale = np.ones_like(radius)
        for amp, f, phase in blob.bumps:
            scale += amp * np.cos(
                (f[0] * u[0] + f[1] * u[1] + f[2] * u[2]) * inv + phase
            )
        radius = radius / scale
    return radius.astype(np.float32), u


def paint(image, grid, blob, value, where=None, inside=1.0):
    """Sets voxels inside ``blob`` (normalised radius < ``inside``).

    Args:
        image: array to modify in place.
        value: scalar, or a callable ``(box, d, u) -> array`` of the box
            shape for textured fills.
        where: optional callable ``(box) -> bool array`` restricting the
            painted voxels (e.g. "inside the abdominal cavity").

    Returns:
        (box, mask) of the painted voxels, or None when nothing was painted.
    """
    field = blob_field(grid, blob)
    if field is None:
        return None
    box, d, u = field
    mask = d < inside
    if where is not None:
        mask &= where(box)
    if not mask.any():
        return None
    target = image[box]
    if callable(value):
        target[mask] = value(box, d, u)[mask]
    else:
        target[mask] = value
    return box, mask


def _smoothing_matrix(n, spacing, scale_mm, rng_nodes):
    """(n, nodes) Gaussian weights from coarse nodes to fine positions."""
    x = np.arange(n) * spacing
    nodes = np.arange(rng_nodes) * (scale_mm / 2.0) - scale_mm
    w = np.exp(-0.5 * ((x[:, None] - nodes[None, :]) / scale_mm) ** 2)
    # Unit variance at every position (white noise through these weights).
    return (w / np.sqrt((w ** 2).sum(axis=1, keepdims=True))).astype(
        np.float32)


def smooth_noise(rng, shape, spacing, scale_mm):
    """Zero-mean, unit-variance random field varying over ``scale_mm``.

    White noise on a grid of nodes ``scale_mm / 2`` apart, smoothed onto the
    voxels by a separable Gaussian of width ``scale_mm`` (three small matrix
    products: cheap even for boxes of millions of voxels, and deterministic
    for a given ``rng`` state).
    """
    counts = [int(np.ceil(n * sp / (scale_mm / 2.0))) + 5
              for n, sp in zip(shape, spacing)]
    field = rng.standard_normal(counts).astype(np.float32)
    mats = [_smoothing_matrix(n, sp, scale_mm, c)
            for n, sp, c in zip(shape, spacing, counts)]
    field = np.tensordot(field, mats[2], axes=([2], [1]))  # (cz, cy, nx)
    field = np.einsum("abx,yb->ayx", field, mats[1])  # (cz, ny, nx)
    field = np.tensordot(mats[0], field, axes=([1], [0]))  # (nz, ny, nx)
    return np.ascontiguousarray(field, dtype=np.float32)


def box_shape(box):
    return tuple(b.stop - b.start for b in box)
