"""Kidneys and kidney tumours of a synthetic CT (see :mod:`cases`).

A kidney is a bean: a deformed ellipsoid, tilted like a real one (upper pole
medial and posterior, hilum facing front-medial), with a 5-8 mm enhancing
cortex, darker medullary pyramids separated by cortical columns, and a
fat-filled sinus opening medially at the hilum (sinus and hilum are labelled
background, as in KiTS19 where the label follows the parenchyma).

A tumour is a rounder blob centred on the kidney surface, between mostly
inside (endophytic) and mostly outside (exophytic), sized like real KiTS
tumours (:func:`sample_tumour_radius`), with a heterogeneous texture below the cortex's enhancement and a necrotic core
when large: its HU overlap medulla, liver and bowel, its texture and shape
do not.
"""

import numpy as np
from scipy import ndimage

from kits_keras.synthetic.anatomy import cavity_test
from kits_keras.synthetic.shapes import Blob
from kits_keras.synthetic.shapes import blob_field
from kits_keras.synthetic.shapes import box_shape
from kits_keras.synthetic.shapes import paint
from kits_keras.synthetic.shapes import random_bumps
from kits_keras.synthetic.shapes import rotation
from kits_keras.synthetic.shapes import smooth_noise

BONE_HU = 300.0  # tumours and fat margins never overwrite bone

# Tumour size as on real scans: the radius of the volume-equivalent sphere
# of the 16 real tumour labels in ../shared/data (8 KiTS19, 8 KiTS23) is
# 6-85 mm, median 19.6 mm, SD of its logarithm 0.73; 3 of 16 are under
# 10 mm. The draw before, log-uniform from 1.5 coarsest voxels (at least
# 4 mm) to 55 mm, depended on the grid: from 4 mm, 35 % of draws were
# under 10 mm; on small cases with 5 mm slices (from 7.5 mm) it painted a
# median of 18.6 mm, 12 % under 10 mm (24 cases), already close. The
# median drawn is above the real one because painted tumours come out
# smaller (cut by the body cavity and bone, voxelised, the largest redrawn
# under the 40 % kidney cap): 60 generated small cases have a painted
# median of 17.7 mm, 10 % under 10 mm.
TUMOUR_RADIUS_MEDIAN_MM = 23.0
TUMOUR_RADIUS_LOG_SD = 0.7
TUMOUR_RADIUS_MAX_MM = 55.0  # larger ones would swallow the whole kidney


def sample_tumour_radius(rng, min_radius):
    """Radius (mm) of a tumour's volume-equivalent sphere.

    Log-normal around :data:`TUMOUR_RADIUS_MEDIAN_MM`, redrawn until it lies
    in ``[min_radius, TUMOUR_RADIUS_MAX_MM]``.

    >>> rng = np.random.default_rng(0)
    >>> radii = [sample_tumour_radius(rng, 6.0) for _ in range(2000)]
    >>> bool(20.0 < np.median(radii) < 26.0), bool(min(radii) >= 6.0)
    (True, True)
    """
    while True:
        radius = TUMOUR_RADIUS_MEDIAN_MM * float(
            np.exp(TUMOUR_RADIUS_LOG_SD * rng.normal()))
        if min_radius <= radius <= TUMOUR_RADIUS_MAX_MM:
            return radius


def sample_enhancement(rng, tissue):
    """Cortex, medulla and tumour HU for the case's contrast phase.

    Corticomedullary differentiation is strongest in the arterial phase,
    gone without contrast and in the nephrographic phase; clear-cell
    tumours enhance as much as cortex in the arterial phase, papillary
    ones barely (``tumour`` is the range of a tumour's mean HU).
    """
    cortex = tissue["cortex"]
    phase = tissue.get("phase", "portal-venous")
    if phase == "non-contrast":
        medulla = cortex - rng.uniform(0.0, 8.0)
        tumour = (15.0, 45.0)
    elif phase == "arterial":
        medulla = max(cortex - rng.uniform(60.0, 120.0), 50.0)
        tumour = (40.0, cortex - 10.0)
    elif phase == "nephrographic":
        medulla = cortex - rng.uniform(0.0, 15.0)
        tumour = (35.0, min(120.0, cortex - 30.0))
    else:
        medulla = max(cortex - rng.uniform(40.0, 90.0), 70.0)
        tumour = (35.0, min(115.0, cortex - 45.0))
    return {"cortex": cortex, "medulla": medulla, "tumour": tumour}


def _kidney_blob(rng, side):
    """side: -1 right (low l), +1 left."""
    centre = (rng.uniform(-22.0, -5.0) if side < 0 else rng.uniform(-6, 10),
              rng.uniform(-2.0, 12.0), side * rng.uniform(55.0, 72.0))
    radii = (rng.uniform(48.0, 60.0), rng.uniform(20.0, 26.0),
             rng.uniform(26.0, 32.0))
    rot = rotation(angles=(side * rng.uniform(0.3, 0.6),
                           side * rng.uniform(0.15, 0.3),
                           rng.uniform(-0.2, 0.2)))
    return Blob(centre, radii, rot, random_bumps(rng, 3, 0.06, 2.0))


def _hilum_direction(blob, side):
    """Unit vector (shape coordinates) pointing at the hilum."""
    medial_front = np.array([0.0, -0.45, -side])
    h = np.asarray(blob.rot) @ medial_front
    h = h * np.asarray(blob.radii) / np.linalg.norm(h * blob.radii)
    return h / np.linalg.norm(h)


def _paint_kidney(image, labels, grid, blob, side, tissue, enh, rng):
    fat = Blob(blob.centre, tuple(r + rng.uniform(4.0, 10.0)
                                  for r in blob.radii), blob.rot, blob.bumps)
    paint(image, grid, fat, tissue["fat"],
          where=lambda box: image[box] < BONE_HU)
    field = blob_field(grid, blob)
    if field is None:
        return
    box, d, u = field
    h = _hilum_direction(blob, side)
    norm = np.maximum(d, 1e-6)
    inside = d < 1.0
    # Sinus: a rounded pocket from the centre out through the hilum.
    shift = rng.uniform(0.45, 0.6)
    size = (rng.uniform(0.35, 0.45), 0.42, 0.42)
    sinus = sum(((u[a] - shift * h[a]) / size[a]) ** 2 for a in range(3)) < 1.0
    sinus |= d < 0.3
    parenchyma = inside & ~sinus
    cortex_depth = rng.uniform(5.0, 8.0) / np.mean(blob.radii[1:])
    angle = np.arctan2(u[2], u[1])
    pyramids = (np.cos(7.0 * angle + rng.uniform(0, 6.3))
                * np.cos(np.pi * 2.5 * u[0] / norm + rng.uniform(0, 6.3))
                > -0.45) & (d < 1.0 - cortex_depth) & (d > 0.36)
    values = np.where(pyramids, enh["medulla"], enh["cortex"])
    values = values + 5.0 * smooth_noise(rng, box_shape(box), grid.spacing,
                                         6.0)
    target = image[box]
    target[inside & sinus] = tissue["fat"] + rng.uniform(30.0, 60.0)
    target[parenchyma] = values[parenchyma]
    labels[box][parenchyma] = 1


def _tumour_blob(rng, kidney, side, radius):
    h = _hilum_direction(kidney, side)
    while True:
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        if v @ h < 0.2:
            break
    rot_t = np.asarray(kidney.rot).T
    surface = np.add(kidney.centre, rot_t @ (np.asarray(kidney.radii) * v))
    normal = rot_t @ (v / np.asarray(kidney.radii))
    normal /= np.linalg.norm(normal)
    centre = surface + normal * radius * rng.uniform(-0.5, 0.6)
    radii = tuple(radius * rng.uniform(0.85, 1.15, 3))
    return Blob(tuple(centre), radii, rotation(rng),
                random_bumps(rng, 3, 0.14, 2.0))


def _tumour_fill(rng, grid, enh, radius):
    base = rng.uniform(*enh["tumour"])
    amplitude = rng.uniform(10.0, 25.0)
    scale = rng.uniform(3.0, 8.0)
    core = rng.uniform(0.3, 0.65) if radius > 15.0 else 0.0
    necrosis = rng.uniform(25.0, 55.0)

    def fill(box, d, u):
        tex = smooth_noise(rng, box_shape(box), grid.spacing, scale)
        out = base + amplitude * tex
        if core:
            # Soft-edged necrotic core, irregular through the texture.
            w = np.clip((core - d) / 0.15 + 0.5 * tex, 0.0, 1.0)
            out = out - necrosis * w
        return np.maximum(out, min(5.0, base - 10.0))

    return fill


def paint_kidneys(image, grid, body, tissue, rng, min_radius=None):
    """Paints one or two kidneys and 1-2 tumours; returns uint8 labels."""
    labels = np.zeros(grid.shape, np.uint8)
    enh = sample_enhancement(rng, tissue)
    sides = [-1, 1]
    if rng.random() < 0.15:
        sides = [int(rng.choice(sides))]  # the other one was removed
    kidneys = {side: _kidney_blob(rng, side) for side in sides}
    for side, blob in kidneys.items():
        _paint_kidney(image, labels, grid, blob, side, tissue, enh, rng)
    if min_radius is None:
        min_radius = max(1.5 * max(grid.spacing), 4.0)
    inside = cavity_test(grid, body)
    count = 1 if rng.random() < 0.85 else 2
    painted = 0
    kidney_voxels = int((labels == 1).sum())
    for _ in range(30):
        side = int(rng.choice(sides))
        radius = sample_tumour_radius(rng, min_radius)
        blob = _tumour_blob(rng, kidneys[side], side, radius)
        field = blob_field(grid, blob)
        if field is None:
            continue
        box, d, u = field
        mask = (d < 1.0) & inside(box) & (image[box] < BONE_HU)
        # Keep most of the kidney visible: a tumour that would swallow more
        # than 40% of the parenchyma is redrawn (smaller on average).
        if not mask.any() or (labels[box][mask] == 1).sum() > (
                0.4 * kidney_voxels):
            continue
        fill = _tumour_fill(rng, grid, enh, radius)(box, d, u)
        image[box][mask] = fill[mask]
        labels[box][mask] = 2
        painted += 1
        if painted >= count:
            break
    return labels


def paint_from_labels(image, labels, grid, tissue, rng, cysts=None):
    """Kidney and tumour intensities following a real label volume.

    Cortex = kidney voxels within 5-8 mm of the background; the rest is
    medulla broken into pyramids by a smooth random field; tumours get the
    same texture and necrosis as synthetic ones; a 3-7 mm fat rim separates
    the labels from whatever organ was painted around them. ``cysts`` (a
    boolean mask, KiTS23's label 3) are painted water-like (0-20 HU, no
    enhancement) wherever the labels are foreground.
    """
    fg = labels > 0
    if not fg.any():
        return
    margin = [int(np.ceil(15.0 / sp)) for sp in grid.spacing]
    idx = np.nonzero(fg.any(axis=(1, 2))), np.nonzero(fg.any(axis=(0, 2))), \
        np.nonzero(fg.any(axis=(0, 1)))
    box = tuple(slice(max(int(i[0][0]) - m, 0), min(int(i[0][-1]) + m + 1, n))
                for i, m, n in zip(idx, margin, labels.shape))
    sub = labels[box]
    target = image[box]
    fg = sub > 0
    enh = sample_enhancement(rng, tissue)
    outside = ndimage.distance_transform_edt(~fg, sampling=grid.spacing)
    rim = (outside > 0) & (outside <= rng.uniform(3.0, 7.0))
    target[rim & (target < BONE_HU)] = tissue["fat"]
    depth = ndimage.distance_transform_edt(fg, sampling=grid.spacing)
    shape = box_shape(box)
    pyramid = smooth_noise(rng, shape, grid.spacing, 7.0) > 0.1
    cortex = depth < rng.uniform(5.0, 8.0)
    kidney = sub == 1
    values = np.where(cortex | ~pyramid, enh["cortex"], enh["medulla"])
    values = values + 5.0 * smooth_noise(rng, shape, grid.spacing, 6.0)
    target[kidney] = values[kidney]
    tumour = sub == 2
    if tumour.any():
        radius = float(np.cbrt(tumour.sum() * np.prod(grid.spacing) * 0.24))
        core = ndimage.distance_transform_edt(tumour, sampling=grid.spacing)
        d = 1.0 - core / max(core.max(), 1e-6)  # 0 deep inside, 1 at edge
        fill = _tumour_fill(rng, grid, enh, radius)(box, d.astype(np.float32),
                                                    None)
        target[tumour] = fill[tumour]
    if cysts is not None:
        cyst = cysts[box] & fg
        if cyst.any():
            water = rng.uniform(0.0, 20.0) + 3.0 * smooth_noise(
                rng, shape, grid.spacing, 5.0)
            target[cyst] = water[cyst]


CYST_HU = (0.0, 20.0)  # simple cyst: water density, no enhancement


def paint_cysts(image, labels, grid, body, rng, min_radius=None,
                probability=0.6, label=3):
    """Paints 0-3 simple renal cysts; labels them ``label`` (KiTS23: 3).

    A cyst is a sphere (radius ``min_radius``-30 mm, log-uniform) centred
    in the outer 8 mm of a kidney (the cortex), so it sits inside the
    kidney or bulges out of it and always touches it: round, sharp-edged,
    water-like (a uniform 0-20 HU with 2 HU of texture), the same in every
    contrast phase. A case has cysts with ``probability`` (1: 60 %, 2: 25 %,
    3: 15 %). Tumours and bone are never overwritten, and a cyst that would
    take more than 30 % of the kidney is redrawn.

    Args:
        image: float32 ``(z, y, x)`` HU, painted in place.
        labels: uint8 ``(z, y, x)``, 1 kidney, 2 tumour; modified in place.
        grid: :class:`Grid` of both.
        body: the body of :func:`anatomy.sample_body` (cysts stay inside
            the abdominal cavity).
        rng: ``np.random.Generator``.
        min_radius: mm. Defaults to 1.5 coarsest voxels, at least 4 mm.
        probability: chance that the case has any cyst.
        label: the cyst's label value.

    Returns:
        int: the number of cysts painted.
    """
    if rng.random() >= probability:
        return 0
    count = int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
    kidney = labels == 1
    if not kidney.any():
        return 0
    centres = _cortex_voxels(labels, grid)
    if min_radius is None:
        min_radius = max(1.5 * max(grid.spacing), 4.0)
    inside = cavity_test(grid, body)
    kidney_voxels = int(kidney.sum())
    painted = 0
    for _ in range(10 * count):
        centre = centres[rng.integers(len(centres))]
        radius = float(np.exp(rng.uniform(np.log(min_radius), np.log(30.0))))
        mask, box = _cyst_mask(grid, centre, radius, image, labels, inside)
        if mask is None or (labels[box][mask] == 1).sum() > (
                0.3 * kidney_voxels):
            continue
        water = rng.uniform(*CYST_HU) + 2.0 * smooth_noise(
            rng, box_shape(box), grid.spacing, 4.0)
        image[box][mask] = np.clip(water, *CYST_HU)[mask]
        labels[box][mask] = label
        painted += 1
        if painted >= count:
            break
    return painted


def _cortex_voxels(labels, grid, depth_mm=8.0):
    """``(n, 3)`` indices of the kidney voxels (label 1) within
    ``depth_mm`` of anything that is not foreground: where cysts and added
    tumours are centred. The distance map is computed only on the
    foreground's box (full cases are big)."""
    box = ndimage.find_objects((labels > 0).astype(np.uint8))[0]
    box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)
    depth = ndimage.distance_transform_edt(labels[box] > 0,
                                           sampling=grid.spacing)
    return np.argwhere((labels[box] == 1) & (depth <= depth_mm)) + [
        b.start for b in box]


def add_tumours(image, labels, grid, body, rng, count=1, min_radius=None):
    """Labels ``count`` more tumours (2) on the kidneys of a label volume.

    Tumour synthesis for training on few real cases (as TumorCP pastes
    real tumours elsewhere, Yang et al. MICCAI 2021, and Hu et al., CVPR
    2023, paint synthetic ones): each is a generated tumour's blob, sized
    by :func:`sample_tumour_radius`, centred in a kidney's outer 8 mm, so
    that it lies inside the kidney or bulges out of it. Only labels are
    changed: :func:`paint_from_labels` then paints these tumours like the
    real ones. Bone (``image``, already painted), tumours, cysts and what
    lies outside the abdominal cavity are never labelled; a tumour that
    would take more than 40 % of the kidney is redrawn.

    Args:
        image: float32 ``(z, y, x)`` HU with bone painted (read only).
        labels: uint8 ``(z, y, x)``, 1 kidney; modified in place.
        grid: :class:`Grid` of both.
        body: the body of :func:`anatomy.sample_body`.
        rng: ``np.random.Generator``.
        count: int. Tumours to add.
        min_radius: mm. Defaults to 1.5 coarsest voxels, at least 4 mm.

    Returns:
        int: the number of tumours added (fewer than ``count`` only when
        the kidneys are too small to take one).
    """
    if count < 1 or not (labels == 1).any():
        return 0
    centres = _cortex_voxels(labels, grid)
    if min_radius is None:
        min_radius = max(1.5 * max(grid.spacing), 4.0)
    inside = cavity_test(grid, body)
    kidney_voxels = int((labels == 1).sum())
    added = 0
    for _ in range(10 * count):
        centre = centres[rng.integers(len(centres))]
        radius = sample_tumour_radius(rng, min_radius)
        blob = Blob(tuple(float(v) for v in grid.to_frame(centre)),
                    tuple(radius * rng.uniform(0.85, 1.15, 3)),
                    rotation(rng), random_bumps(rng, 3, 0.14, 2.0))
        field = blob_field(grid, blob)
        if field is None:
            continue
        box, d, _ = field
        mask = (d < 1.0) & (labels[box] < 2) & (image[box] < BONE_HU) & (
            inside(box))
        # The piece that holds the centre (on the kidney): bone or the
        # cavity's wall can cut the blob.
        pieces, _ = ndimage.label(mask)
        piece = pieces[tuple(int(c) - b.start for c, b in zip(centre, box))]
        if piece == 0:
            continue
        mask = pieces == piece
        if (labels[box][mask] == 1).sum() > 0.4 * kidney_voxels:
            continue
        labels[box][mask] = 2
        added += 1
        if added >= count:
            break
    return added


def _cyst_mask(grid, centre, radius, image, labels, inside):
    """``(mask, box)`` of a sphere at voxel ``centre``, radius mm, less
    tumour, bone and what lies outside the cavity, reduced to the piece
    holding ``centre``; ``(None, None)`` when the sphere misses the grid."""
    half = [int(np.ceil(radius / s)) for s in grid.spacing]
    box = tuple(slice(max(int(c) - h, 0), min(int(c) + h + 1, n))
                for c, h, n in zip(centre, half, grid.shape))
    offsets = np.ogrid[tuple(slice(b.start - int(c), b.stop - int(c))
                             for b, c in zip(box, centre))]
    r2 = sum((o * s) ** 2 for o, s in zip(offsets, grid.spacing))
    mask = (r2 <= radius ** 2) & (labels[box] != 2) & (
        image[box] < BONE_HU) & inside(box)
    pieces, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    piece = pieces[tuple(int(c) - b.start for c, b in zip(centre, box))]
    if piece == 0:
        return None, None
    return pieces == piece, box
