"""Synthetic contrast-enhanced abdominal CT cases in the KiTS19 layout.

Everything downstream (TFDS builder, training, inference, benchmarks) can
run on these without the 30 GB KiTS19 download. A case has the KiTS19 files
``case_XXXXX/imaging.nii.gz`` (HU, stored int16 like the scanner's DICOM) and
``segmentation.nii.gz`` (uint8: 0 background, 1 kidney, 2 tumour), arrays in
``(z, y, x)`` order (axis 0 = slices, head to feet) and the KiTS19 affine
``[[0, 0, -sx, 0], [0, -sy, 0, 0], [-sz, 0, 0, 0], [0, 0, 0, 1]]``.

Anatomy: air around an elliptical body of random size with subcutaneous
fat, abdominal wall muscle, visceral fat, lower ribs, vertebrae with
cortical rims and discs, psoas and paraspinal muscles, aorta and IVC, a
textured liver with vessels and hypodense lesions, spleen, lung bases,
bowel loops (fluid, gas, oral contrast), a CT table with a foam pad (or
none), one or two kidneys with cortex, medullary pyramids and a fat-filled
sinus, and one or two tumours attached to a kidney (sized like real KiTS
tumours: painted radius median ~18 mm, 4-55 mm and at least 1.5 voxels of
the coarsest spacing; heterogeneous, necrotic core when large; never more
than 40% of the kidney swallowed). 15% of cases have a
single kidney. Each case draws a contrast phase (non-contrast, arterial,
portal venous, nephrographic), which sets every organ's HU and how the
kidney and tumour enhance: without contrast the kidney is as grey as liver,
spleen, bowel and muscle, and in the arterial phase a clear-cell tumour is
as bright as cortex, so position, shape and texture matter, not a HU
threshold. Correlated noise (8-35 HU) and an in-plane blur (0.5-1.2 mm)
finish the image. Around real label volumes (``labels_from``), KiTS23's
cysts are painted as water-density cysts and labelled kidney (see Cysts).

Cysts: generated cases, and label volumes without a cyst label (KiTS19's,
whose kidney label holds the patient's cysts at places we do not know),
get 0-3 simple cysts (60 % of cases have any): round, sharp-edged, 0-20 HU
whatever the phase, centred in a kidney's cortex so they lie inside it or
bulge out of it (:func:`kidney.paint_cysts`; a bulging cyst extends the
kidney label, as an annotator would have drawn it). KiTS23 label volumes
keep their own. They are labelled kidney, as KiTS19 annotated them, or 3 with
KiTS23's classes (``cysts=True``, ``synth --classes kits23``). The cysts
are drawn from their own random stream, so a KiTS23 case is its KiTS19
twin (same seed) with the cysts labelled 3 instead of 1.

Extra tumours (``extra_tumours=N``, ``synth --extra-tumours N``): around a
label volume, N more tumours are added to its labels before anything is
painted (:func:`kidney.add_tumours`: a generated tumour's blob and size,
centred in a kidney's outer 8 mm) and painted like its real ones, so that a
training set of few real cases sees more tumours, at other places and of
other sizes (tumour synthesis). Their own random stream: the rest of the
case draws the same numbers.

Sizes:
    "small": 24-64 slices 3-5 mm apart, 96-160 px wide (AP: the same or
        0.8x) at 2.2-3.2 mm in plane, i.e. a real abdomen's field of view
        coarsely sampled: well under a second a case.
    "full": KiTS19 sizes: 512 x 512 (1 in 10: 512 x 796) at 0.5-1.0 mm in
        plane, 0.5-5 mm slices over 150-320 mm of body, capped at
        ``MAX_FULL_SLICES`` (300; KiTS19 goes to 1059) to bound memory
        and time (~5-15 s a case on one core).

Determinism: ``make_case(seed)`` draws everything from
``np.random.default_rng(seed)``; ``write_cases(seed=S)`` gives case ``i``
the seed ``S + i``. Same seed, same bytes.

Example:
    >>> case = make_case(0)
    >>> case.image.array.shape == case.labels.array.shape
    True
    >>> sorted(set(case.labels.array.ravel().tolist()))
    [0, 1, 2]
"""

import dataclasses
import logging
import os
import shutil
import tempfile

import numpy as np
from scipy import ndimage

from kits_keras import io
from kits_keras.synthetic import anatomy
from kits_keras.synthetic.kidney import add_tumours
from kits_keras.synthetic.kidney import paint_kidneys
from kits_keras.synthetic.kidney import paint_cysts
from kits_keras.synthetic.kidney import paint_from_labels
from kits_keras.synthetic.shapes import Grid

log = logging.getLogger(__name__)

SIZES = ("small", "full")
MAX_FULL_SLICES = 300
TUMOUR_LABEL = 2
CYST_LABEL = 3  # KiTS21/23
_SLICE_SPACINGS = (0.5, 0.625, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)


def kits19_affine(spacing):
    """The KiTS19 voxel-to-world matrix for ``(z, y, x)`` spacing in mm."""
    sz, sy, sx = (float(v) for v in spacing)
    return np.array([[0.0, 0.0, -sx, 0.0], [0.0, -sy, 0.0, 0.0],
                     [-sz, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def sample_geometry(rng, size):
    """Volume shape ``(z, y, x)`` and spacing (mm) of a synthetic scan."""
    if size == "small":
        sz = float(rng.choice([3.0, 4.0, 5.0]))
        nz = int(np.clip(round(rng.uniform(150.0, 220.0) / sz), 24, 64))
        sxy = float(rng.uniform(2.2, 3.2))
        nx = int(np.clip(round(rng.uniform(340.0, 430.0) / sxy), 96, 160))
        ny = nx if rng.random() < 0.6 else int(round(nx * 0.8))
    elif size == "full":
        sz = float(rng.choice(_SLICE_SPACINGS))
        nz = int(np.clip(round(rng.uniform(150.0, 320.0) / sz), 29,
                         MAX_FULL_SLICES))
        if rng.random() < 0.1:
            ny, nx, sxy = 512, 796, float(rng.uniform(0.5, 0.62))
        else:
            ny, nx, sxy = 512, 512, float(rng.uniform(0.62, 0.98))
    else:
        raise ValueError(f"size must be one of {SIZES}. Received: size={size}")
    return (nz, ny, nx), (sz, sxy, sxy)


def _frame_from_labels(labels, spacing):
    """Frame origin (spine at kidney level) and kidney extent from labels.

    The spine goes midway between the two largest label components when
    they lie on either side (two kidneys); behind a single component that
    crosses the middle of the field of view (horseshoe kidney); else 60 mm
    medial of the one kidney, towards the middle of the field of view.
    """
    step = (max(1, int(round(4.0 / spacing[0]))), 4, 4)
    small = labels[:: step[0], :: step[1], :: step[2]] > 0
    comps, n = ndimage.label(small)
    sizes = ndimage.sum_labels(small, comps, range(1, n + 1))
    order = [i for i in np.argsort(sizes)[::-1][:2]
             if sizes[i] >= 0.05 * sizes.max()]  # ignore specks
    centres = [np.multiply(ndimage.center_of_mass(comps == i + 1), step)
               for i in order]
    nz, ny, nx = labels.shape
    centres = [c for c in centres] or [np.array([nz / 2, ny / 2, nx / 2])]
    k = [c[2] for c in centres]
    behind = 5.0  # mm from the kidneys' centre back to the spine's
    if len(k) == 2 and abs(k[0] - k[1]) * spacing[2] > 60.0:
        k0 = float(np.mean(k))
        centres_used = centres
    elif abs(k[0] - nx / 2) * spacing[2] < 40.0:
        # One component across the midline (horseshoe kidney): its isthmus
        # lies in front of the spine.
        k0, centres_used, behind = nx / 2, centres[:1], 30.0
    else:
        # One kidney: the spine goes 60 mm medial of its centre, and at
        # least 25 mm medial of its medial edge (case_00005's fused kidney
        # reaches the midline).
        side = 1.0 if k[0] > nx / 2 else -1.0
        columns = np.nonzero(small.any(axis=(0, 1)))[0] * step[2]
        edge = columns.min() if side > 0 else columns.max()
        k0 = k[0] - side * 60.0 / spacing[2]
        k0 = min(k0, edge - 25.0 / spacing[2]) if side > 0 else max(
            k0, edge + 25.0 / spacing[2])
        centres_used = centres[:1]
    i0 = float(np.mean([c[0] for c in centres_used]))
    j0 = float(np.mean([c[1] for c in centres_used])) + behind / spacing[1]
    grid = Grid(labels.shape, tuple(spacing), (i0, j0, k0))
    idx = np.nonzero(small)
    if idx[0].size:
        _, p, l = grid.to_frame([i * st for i, st in zip(idx, step)])
        extent = (float(np.abs(l).max()), float(p.max()))
    else:
        extent = (80.0, 30.0)
    return grid, extent


def make_case(seed, size="small", labels=None, spacing=None,
              case_id="case_00000", phase=None, cysts=False,
              extra_tumours=0):
    """Generates one synthetic case.

    Args:
        seed: int. Seed of ``np.random.default_rng``.
        size: str. "small" or "full" (see the module docstring). Ignored
            when ``labels`` is given.
        labels: optional label volume to build the CT around: an
            ``io.Volume`` (its spacing, affine, header and orientation are
            kept) or a ``(z, y, x)`` array of {0, 1, 2} with ``spacing``.
            KiTS23's cysts (label 3) are painted as cysts and labelled
            kidney, as KiTS19 annotated them (unless ``cysts``); a volume
            without label 3 gets painted cysts (module docstring), whose
            part bulging out of a kidney extends its label.
        spacing: (z, y, x) mm, needed with an array ``labels``.
        case_id: str. Defaults to "case_00000".
        phase: contrast phase (one of ``anatomy.PHASES``), or
            None to draw one (15 % non-contrast, 25 % arterial, 40 %
            portal venous, 20 % nephrographic).
        cysts: bool. KiTS23 classes: label 3 is a cyst. Defaults to
            False (KiTS19: labels 0-2, cysts labelled kidney).
        extra_tumours: int. With ``labels``: tumours to add to the label
            volume's kidneys (:func:`kidney.add_tumours`; a training set
            of few real cases sees more tumours), drawn from a stream of
            their own. Defaults to 0.

    Returns:
        io.Case with image float32 HU (integer-valued) and labels uint8.
    """
    if extra_tumours and labels is None:
        raise ValueError("extra_tumours adds tumours to given labels; "
                         "generated cases draw their own")
    rng = np.random.default_rng(seed)
    volume = labels if isinstance(labels, io.Volume) else None
    generated = labels is None
    grid, extent, labels = _frame(rng, size, labels, spacing)
    image = np.full(grid.shape, anatomy.AIR, np.float32)
    fov = grid.shape[2] * grid.spacing[2]
    body = anatomy.sample_body(rng, extent, fov_mm=min(fov, 520.0))
    tissue = anatomy.sample_tissue(rng, phase)
    anatomy.paint_body(image, grid, body, tissue, rng)
    anatomy.paint_muscles(image, grid, tissue, rng)
    anatomy.paint_spine(image, grid, tissue, rng)
    anatomy.paint_ribs(image, grid, body, tissue, rng)
    anatomy.paint_vessels(image, grid, tissue, rng)
    anatomy.paint_organs(image, grid, body, tissue, rng)
    if extra_tumours:
        labels = labels.astype(np.uint8)  # a copy: the caller's stays
        add_tumours(image, labels, grid, body,
                    np.random.default_rng((seed, TUMOUR_LABEL)),
                    extra_tumours)
    labels = _paint_labels(image, grid, body, tissue, rng, labels)
    if generated or not (labels == CYST_LABEL).any():
        # Simple cysts are common in the kidneys of KiTS patients, and a
        # KiTS19 label volume's kidney already includes its patient's, at
        # places we do not know: paint some. A stream of their own: the
        # rest of the case does not depend on them.
        paint_cysts(image, labels, grid, body,
                    np.random.default_rng((seed, CYST_LABEL)),
                    label=CYST_LABEL)
    if not cysts:
        # KiTS19 annotated cysts as kidney.
        labels = np.where(labels == CYST_LABEL, np.uint8(1), labels)
    anatomy.finish(image, grid, rng, noise_hu=rng.uniform(8.0, 35.0),
                   blur_mm=rng.uniform(0.5, 1.2))
    if volume is not None:
        geometry = dict(affine=volume.affine, header=volume.header,
                        orientation=volume.orientation)
    else:
        geometry = dict(affine=kits19_affine(grid.spacing), header=None,
                        orientation=io.FILE_LAYOUT)
    spacing = tuple(float(v) for v in grid.spacing)
    return io.Case(
        case_id,
        io.Volume(image, spacing, **geometry),
        io.Volume(labels, spacing, **geometry),
    )


def _frame(rng, size, labels, spacing):
    """``(grid, kidney extent or None, labels array or None)`` of a case.

    Without ``labels``, a random scan geometry of ``size`` with the spine
    near the middle; with them (an ``io.Volume``, or an array with
    ``spacing`` in mm), their grid, framed by :func:`_frame_from_labels`.
    """
    if labels is None:
        shape, spacing = sample_geometry(rng, size)
        origin = (shape[0] * rng.uniform(0.42, 0.58),
                  shape[1] / 2 + rng.uniform(15.0, 40.0) / spacing[1],
                  shape[2] / 2 + rng.uniform(-12.0, 12.0) / spacing[2])
        return Grid(shape, spacing, origin), None, None
    if isinstance(labels, io.Volume):
        labels, spacing = labels.array, labels.spacing
    if spacing is None:
        raise ValueError("spacing is required with a labels array")
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D. Received: {labels.shape}")
    grid, extent = _frame_from_labels(labels, spacing)
    return grid, extent, labels


def _paint_labels(image, grid, body, tissue, rng, labels):
    """Paints kidneys and tumours into ``image``; returns uint8 labels.

    Without ``labels`` they are drawn at random; else the given ones are
    painted, KiTS23 cysts (label 3) as water-density cysts; the labels are
    returned as given (uint8), cysts included.
    """
    if labels is None:
        return paint_kidneys(image, grid, body, tissue, rng)
    labels = labels.astype(np.uint8)
    cysts = labels == CYST_LABEL
    # Painted as kidney, then water over the cysts.
    painted = np.where(cysts, np.uint8(1), labels) if cysts.any() else labels
    paint_from_labels(image, painted, grid, tissue, rng,
                      cysts if cysts.any() else None)
    return labels


def read_label_volume(path):
    """Reads a KiTS19 (0-2) or KiTS23 (0-3, 3 = cyst) label volume.

    Returns:
        io.Volume, uint8 values in {0, 1, 2, 3}.

    Raises:
        io.CaseError: unreadable, or values outside {0, 1, 2, 3}.
    """
    volume = io.read_volume(path, None)
    values = volume.array
    if not np.issubdtype(values.dtype, np.integer) and (
            not np.all(np.isfinite(values))
            or np.any(values != np.round(values))):
        raise io.CaseError(f"{volume.path}: labels must be integers 0-3")
    if values.min() < 0 or values.max() > CYST_LABEL:
        raise io.CaseError(f"{volume.path}: label values outside "
                           "{0, 1, 2, 3} (KiTS19 or KiTS23)")
    return dataclasses.replace(volume, array=values.astype(np.uint8,
                                                           copy=False))


def _case_ids(labels_from, num_cases):
    if labels_from is None:
        return [(f"case_{i:05d}", None) for i in range(num_cases)]
    found = io.find_cases(labels_from)
    pairs = []
    for case_dir in found:
        path = f"{case_dir}/{io.LABELS_FILE}"
        pairs.append((case_dir.rsplit("/", 1)[-1], path))
    if not pairs:
        raise io.CaseError(f"{labels_from}: no case_XXXXX folders")
    return pairs if num_cases is None else pairs[:num_cases]


def write_cases(out_dir, num_cases=None, seed=0, size="small",
                labels_from=None, preview=False, overwrite=False,
                on_case=None, cysts=False, extra_tumours=0):
    """Writes synthetic ``case_XXXXX/`` folders under ``out_dir``.

    All cases are first written to a hidden staging folder inside
    ``out_dir`` and moved into place only when every one succeeded, so a
    bad label file leaves no partial case behind.

    Args:
        out_dir: str. Destination folder (created).
        num_cases: int. Number of cases; with ``labels_from``, at most this
            many (None: all). Defaults to 3 without ``labels_from``.
        seed: int. Case ``i`` uses seed ``seed + i``. Defaults to 0.
        size: "small" or "full". Defaults to "small".
        labels_from: optional folder of ``case_XXXXX/segmentation.nii.gz``;
            one case per label volume, keeping its case id and geometry.
        preview: bool. Also write ``case_XXXXX/preview.png``.
        overwrite: bool. Replace existing case folders (otherwise an error).
        on_case: optional callable ``(case_dir, case)`` called as each case
            is ready (for progress output); ``case_dir`` is where it will
            be once all are done.
        cysts: bool. KiTS23 classes (label 3 = cyst; see
            :func:`make_case`). Defaults to False: KiTS19's 0-2, a label
            volume's cysts labelled kidney.
        extra_tumours: int. With ``labels_from``: tumours added to each
            label volume (:func:`make_case`). Defaults to 0.

    Returns:
        list of str: the case folders written.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}. Received: size={size}")
    if labels_from is None and num_cases is None:
        num_cases = 3
    if extra_tumours and labels_from is None:
        raise ValueError("extra_tumours needs labels_from")
    if num_cases is not None and num_cases < 1:
        raise ValueError(f"num_cases must be >= 1. Received: {num_cases}")
    pairs = _case_ids(labels_from, num_cases)
    out_dir = os.fspath(out_dir)
    for case_id, _ in pairs:
        target = os.path.join(out_dir, case_id)
        if os.path.exists(target) and not overwrite:
            raise io.CaseError(
                f"{target}: already exists (--overwrite / overwrite=True "
                "replaces it)")
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".synth-", dir=out_dir)
    done = False
    try:
        written = [
            _stage_case(staging, out_dir, seed + index, size, case_id,
                        label_path, preview, on_case, cysts, extra_tumours)
            for index, (case_id, label_path) in enumerate(pairs)]
        for tmp_dir, final in written:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp_dir, final)
        done = True
        return [final for _, final in written]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not done:
            # Nothing of a failed run stays behind, not even the folder.
            shutil.rmtree(out_dir, ignore_errors=True)


def _stage_case(staging, out_dir, seed, size, case_id, label_path, preview,
                on_case, cysts=False, extra_tumours=0):
    """Writes one case under ``staging``; returns ``(staged folder, final
    folder)``. Only the files are kept: full cases are large."""
    labels = None if label_path is None else read_label_volume(label_path)
    case = make_case(seed, size, labels, case_id=case_id, cysts=cysts,
                     extra_tumours=extra_tumours)
    case_dir = os.path.join(staging, case_id)
    _save_case(case_dir, case, preview)
    final = os.path.join(out_dir, case_id)
    log.debug("synthesised %s %s", case_id, case.image.array.shape)
    if on_case is not None:
        on_case(final, case)
    return case_dir, final


def _save_case(case_dir, case, preview):
    os.makedirs(case_dir)
    image = case.image
    io.save_nifti(f"{case_dir}/{io.IMAGE_FILE}",
                  image.array.astype(np.int16), image.affine, image.header,
                  image.orientation)
    io.save_like(f"{case_dir}/{io.LABELS_FILE}", case.labels.array,
                 case.labels)
    if preview:
        from kits_keras import viz

        viz.save_case_preview(f"{case_dir}/preview.png", case)


def case_summary(case):
    """Small dict describing a case (shape, spacing, label volumes in mL;
    ``cyst_ml`` is 0 when the labels have no cyst)."""
    ml = io.label_volumes_ml(case.labels.array, case.spacing, num_classes=4)
    return dataclasses.asdict(_Summary(
        case.case_id, tuple(case.image.array.shape), case.spacing,
        ml["kidney_ml"], ml["tumour_ml"], ml["cyst_ml"]))


@dataclasses.dataclass(frozen=True)
class _Summary:
    case_id: str
    shape: tuple
    spacing: tuple
    kidney_ml: float
    tumour_ml: float
    cyst_ml: float
