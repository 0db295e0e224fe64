"""KiTS23 metrics: Dice and Surface Dice per hierarchical evaluation class.

KiTS23 labels: 0 background, 1 kidney, 2 tumour, 3 cyst. The challenge
scores three hierarchical evaluation classes (HECs), each a union of labels,
with two metrics each: volumetric Dice and Surface Dice at a per-HEC
tolerance in mm. Definitions read from the official evaluation code
(github.com/neheller/kits23, MIT licence, commit c1088353):

* ``kits23/configuration/labels.py``: ``KITS_HEC_LABEL_MAPPING``
  (``kidney_and_mass`` = {1, 2, 3}, ``mass`` = {2, 3}, ``tumor`` = {2}) and
  ``HEC_SD_TOLERANCES_MM`` (1.0330772532390826, 1.1328796488598762,
  1.1498198361434828 mm; from KiTS21's inter-rater study).
* ``kits23/evaluation/metrics.py`` ``compute_metrics_for_label``: both
  masks empty gives Dice = Surface Dice = 1; exactly one empty gives 0 and
  0; otherwise Dice, and Surface Dice from DeepMind's ``surface-distance``
  package (``compute_surface_distances(mask_gt, mask_pred, spacing)`` then
  ``compute_surface_dice_at_tolerance``), with the spacing in array axis
  order. A case's score is the 3 x 2 table; the challenge averages each
  entry over cases.

Surface Dice here follows the same definition (Nikolov et al. 2021,
arXiv:1809.04430): the surface area of each mask lying within the
tolerance of the other mask's surface, summed over both masks, divided by
the sum of both surface areas. The code is this module's own, written from
that definition and from the choices read in ``surface-distance``
(github.com/deepmind/surface-distance, ``surface_distance/metrics.py``
``compute_surface_distances``):

* Surface elements sit on the voxel-corner grid: a corner is on the
  surface when the 2x2x2 voxels around it are mixed (some in, some out;
  outside the array counts as out), as in ``surface-distance``. Unlike
  border voxels found by erosion, this band straddles the boundary.
* Distances are Euclidean, in mm, from each surface corner to the nearest
  surface corner of the other mask (``scipy.ndimage.distance_transform_edt``
  with ``sampling=spacing``), as in ``surface-distance``. They are computed
  on the two masks' joint bounding box: every surface corner lies inside
  it, so the distances are exact while the memory scales with the
  structures, not with the 512 x 512 x ~1000 scan.
* Weights differ: ``surface-distance`` gives each corner the area of its
  marching-cubes triangles (a 256-entry table); here each corner gets the
  norm of the 2x2x2 cell's mean gradient, ``sqrt(sum_i (g_i * a_i) ** 2)``
  with ``g_i`` = (voxels in on the upper side of axis ``i`` minus those on
  the lower side) / 4 and ``a_i`` the voxel face area across axis ``i`` in
  mm^2. Both give a flat face its exact area. On shifted spheres
  (``tests/test_hec.py``) the two implementations agreed within 0.01 in
  15 configurations (0.4-2 mm voxels, anisotropic included), checked by
  running ``surface-distance`` beside this module.

Known bias, shared with the official metric: the surface band is about a
voxel thick, so distances come out shorter than between the continuous
surfaces, by up to about a voxel. For a sphere of radius R shifted by d the
continuous Surface Dice is ``min(1, tolerance / d)`` (for any R > d); on a
0.5 mm grid with d = 3 mm and tolerance 1.5 mm both implementations give
0.62 instead of 0.5. Border voxels found by erosion gave 0.56 (closer to
the continuous value, but 0.06 from the official one), hence the choice.

Arrays are ``(z, y, x)``; spacings are ``(z, y, x)`` in mm, the order of
the arrays' axes (the official code reverses SimpleITK's ``(x, y, z)``
spacing for the same reason).
"""

import collections

import numpy as np
from scipy import ndimage

from kits_keras import io
from kits_keras.evaluate import EMPTY_DICE
from kits_keras.evaluate import dice

KITS23_LABEL_VALUES = io.KITS23_LABEL_VALUES

HEC = collections.namedtuple("HEC", ["name", "labels", "tolerance_mm"])

# Names follow this project (British spelling); the official keys are
# kidney_and_mass, mass and tumor, in this order.
HECS = (
    HEC("kidney_and_masses", (1, 2, 3), 1.0330772532390826),
    HEC("masses", (2, 3), 1.1328796488598762),
    HEC("tumour", (2,), 1.1498198361434828),
)


def hec_mask(segmentation, labels):
    """Boolean mask of the voxels whose label is one of ``labels``."""
    return np.isin(segmentation, labels)


def hec_dice(pred, truth, labels):
    """Dice of one HEC of two label volumes; 1 when both lack it.

    Args:
        pred: int array. Predicted labels.
        truth: int array of the same shape. Ground-truth labels.
        labels: tuple of ints. The labels merged into the HEC.

    Example:
        >>> truth = np.array([1, 1, 2, 3, 0])
        >>> pred = np.array([1, 2, 2, 0, 0])
        >>> hec_dice(pred, truth, (1, 2, 3))  # 2 * 3 / (3 + 4)
        0.8571428571428571
        >>> hec_dice(pred, truth, (2,))  # 2 * 1 / (2 + 1)
        0.6666666666666666
    """
    return dice(hec_mask(pred, labels), hec_mask(truth, labels))


def surface_dice(pred_mask, truth_mask, spacing_mm, tolerance_mm):
    """Surface Dice of two boolean masks at a tolerance in mm.

    The share of both surfaces' area lying within ``tolerance_mm`` of the
    other surface (see the module docstring for the discretisation).

    Args:
        pred_mask: bool array ``(z, y, x)``.
        truth_mask: bool array of the same shape.
        spacing_mm: 3 floats. Voxel size ``(z, y, x)`` in mm.
        tolerance_mm: float. Largest surface distance counted as overlap.

    Returns:
        float in [0, 1]: :data:`~kits_keras.evaluate.EMPTY_DICE` when both
        masks are empty, 0 when exactly one is (as the official code).

    Example:
        >>> a = np.zeros((12, 12, 12), bool)
        >>> a[2:10, 2:10, 2:10] = True
        >>> b = np.roll(a, 1, axis=2)  # shifted by one voxel along x
        >>> surface_dice(a, b, (1.0, 1.0, 1.0), 1.0)
        1.0
        >>> # 2 mm voxels along x: the end faces are now 2 mm apart (the
        >>> # continuous answer is 0.75: end faces fail, half the strips
        >>> # that overhang pass).
        >>> round(surface_dice(a, b, (1.0, 1.0, 2.0), 1.0), 4)
        0.819
    """
    pred_mask = np.asarray(pred_mask, bool)
    truth_mask = np.asarray(truth_mask, bool)
    if pred_mask.shape != truth_mask.shape or pred_mask.ndim != 3:
        raise ValueError(f"masks must be 3-D and of one shape. Received: "
                         f"{pred_mask.shape} and {truth_mask.shape}")
    if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
        raise ValueError(f"spacing_mm must be 3 positive sizes in mm. "
                         f"Received: spacing_mm={spacing_mm}")
    pred_any, truth_any = pred_mask.any(), truth_mask.any()
    if not (pred_any or truth_any):
        return EMPTY_DICE
    if not (pred_any and truth_any):
        return 0.0
    box = _bounding_box(pred_mask | truth_mask, margin=0)
    pred_mask, truth_mask = pred_mask[box], truth_mask[box]
    pred_border, pred_area = surface_corners(pred_mask, spacing_mm)
    truth_border, truth_area = surface_corners(truth_mask, spacing_mm)
    # One distance map at a time: each is 8 bytes per corner of the box.
    pred_to_truth = _distances_to(truth_border, spacing_mm)[pred_border]
    truth_to_pred = _distances_to(pred_border, spacing_mm)[truth_border]
    overlap = (pred_area[pred_to_truth <= tolerance_mm].sum()
               + truth_area[truth_to_pred <= tolerance_mm].sum())
    return float(overlap / (pred_area.sum() + truth_area.sum()))


def surface_corners(mask, spacing_mm):
    """Surface corners of a boolean mask and the area each carries.

    Corner ``(i, j, k)`` is the shared corner of voxels ``(i - 1 .. i,
    j - 1 .. j, k - 1 .. k)``, so the corner grid is one larger than
    ``mask`` along each axis; outside the array counts as background.

    Args:
        mask: bool array ``(z, y, x)``.
        spacing_mm: 3 floats. Voxel size ``(z, y, x)`` in mm.

    Returns:
        ``(border, areas)``: bool array of the corner grid (True where the
        2x2x2 voxels around a corner are mixed), and a 1-D float array of
        the area in mm^2 of each True corner, in ``np.nonzero`` order.

    Example:
        >>> cube = np.ones((2, 2, 2), bool)
        >>> border, areas = surface_corners(cube, (1.0, 1.0, 1.0))
        >>> int(border.sum())  # 3 x 3 x 3 corners, the centre one inside
        26
        >>> slab = np.ones((2, 4, 4), bool)
        >>> border, areas = surface_corners(slab, (1.0, 0.5, 0.5))
        >>> # Inside an x-y face 0.5 x 0.5 mm^2, a side face 1 x 0.5 mm^2;
        >>> # corners on the slab's edges carry less (they cut them).
        >>> sorted(set(np.round(areas, 4).tolist()))
        [0.1875, 0.25, 0.2795, 0.3536, 0.5]
    """
    padded = np.pad(np.asarray(mask, bool), 1)
    grid = tuple(n - 1 for n in padded.shape)
    cells = {offset: padded[tuple(slice(o, o + n)
                                  for o, n in zip(offset, grid))]
             for offset in np.ndindex(2, 2, 2)}
    inside = sum(cell.astype(np.uint8) for cell in cells.values())
    border = (inside > 0) & (inside < 8)
    del inside
    spacing = np.asarray(spacing_mm, np.float64)
    squared = 0.0
    for axis in range(3):
        face_mm2 = np.prod(np.delete(spacing, axis))
        gradient = sum((1 if offset[axis] else -1) * cell.astype(np.int8)
                       for offset, cell in cells.items())
        squared = squared + (gradient[border] * (face_mm2 / 4.0)) ** 2
    return border, np.sqrt(squared)


def kits23_scores(pred, truth, spacing_mm):
    """Dice and Surface Dice of each KiTS23 HEC for one case.

    Args:
        pred: int array ``(z, y, x)``. Predicted labels in {0, 1, 2, 3}.
        truth: int array of the same shape. Ground-truth labels.
        spacing_mm: 3 floats. Voxel size ``(z, y, x)`` in mm.

    Returns:
        dict: ``{f"{hec}_dice": float, f"{hec}_surface_dice": float}`` for
        each HEC of :data:`HECS`.

    Example:
        >>> truth = np.zeros((6, 6, 6), np.uint8)
        >>> truth[1:5, 1:5, 1:5] = 1
        >>> truth[2:4, 2:4, 2:4] = 2
        >>> pred = np.where(truth == 2, 3, truth)  # tumour called cyst
        >>> scores = kits23_scores(pred, truth, (1.0, 1.0, 1.0))
        >>> scores["masses_dice"], scores["tumour_dice"]
        (1.0, 0.0)
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth must have one shape. Received: "
                         f"{pred.shape} and {truth.shape}")
    # Every HEC lies inside the labelled voxels: crop once, so the masks
    # below cost the kidneys' box, not the whole scan.
    box = _bounding_box((pred > 0) | (truth > 0), margin=1)
    if box is not None:
        pred, truth = pred[box], truth[box]
    scores = {}
    for hec in HECS:
        pred_mask = hec_mask(pred, hec.labels)
        truth_mask = hec_mask(truth, hec.labels)
        scores[f"{hec.name}_dice"] = dice(pred_mask, truth_mask)
        scores[f"{hec.name}_surface_dice"] = surface_dice(
            pred_mask, truth_mask, spacing_mm, hec.tolerance_mm)
    return scores


def _bounding_box(mask, margin):
    """Slices of the foreground's bounding box grown by ``margin`` voxels
    (clipped to the array), or None when ``mask`` is empty."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        if hits.size == 0:
            return None
        box.append(slice(max(hits[0] - margin, 0),
                         min(hits[-1] + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _distances_to(border, spacing_mm):
    """Distance in mm from every voxel to the nearest ``border`` voxel."""
    return ndimage.distance_transform_edt(~border, sampling=spacing_mm)


def kits23_metric():
    """The ``kits-keras evaluate --metric kits23`` report layout."""
    from kits_keras.evaluate import Metric

    dice_keys = tuple(f"{h.name}_dice" for h in HECS)
    sd_keys = tuple(f"{h.name}_surface_dice" for h in HECS)
    short = {"kidney_and_masses": "kid+mas", "masses": "masses",
             "tumour": "tumour"}
    return Metric(
        "kits23", KITS23_LABEL_VALUES, _scores_with_means,
        keys=(*dice_keys, *sd_keys, "mean_dice", "mean_surface_dice"),
        columns=(*((f"{h.name}_dice", short[h.name]) for h in HECS),
                 *((f"{h.name}_surface_dice", f"SD {short[h.name]}")
                   for h in HECS),
                 ("mean_dice", "Dice"), ("mean_surface_dice", "SD")),
        boxes=(*((f"{h.name}_dice", f"{short[h.name]}\nDice") for h in HECS),
               *((f"{h.name}_surface_dice", f"{short[h.name]}\nSD")
                 for h in HECS)),
        title_keys=(("mean_dice", "Dice"), ("mean_surface_dice", "SD"),
                    ("tumour_dice", "tumour Dice")),
        rank_key="mean_dice",
        colours=({1: "#ffd21f", 2: "#ff3030", 3: "#ff8c1a"},
                 {1: "#2fa4ff", 2: "#3cff5a", 3: "#d24dff"}),
        conventions={
            "hecs": {h.name: list(h.labels) for h in HECS},
            "labels": {str(k): v for k, v in
                       enumerate(io.KITS23_CLASS_NAMES) if k > 0},
            "surface_dice_tolerance_mm": {h.name: h.tolerance_mm
                                          for h in HECS},
            "both_empty": EMPTY_DICE,
            "one_empty": 0.0,
            "mean_dice": "mean of the three HEC Dice of the case",
            "mean_surface_dice": "mean of the three HEC Surface Dice",
            "missing_or_error": 0.0,
            "source": "neheller/kits23 kits23/evaluation/metrics.py, "
                      "kits23/configuration/labels.py",
        })


def _scores_with_means(pred, truth, spacing_mm):
    scores = kits23_scores(pred, truth, spacing_mm)
    for metric in ("dice", "surface_dice"):
        scores[f"mean_{metric}"] = float(np.mean(
            [scores[f"{h.name}_{metric}"] for h in HECS]))
    return scores
