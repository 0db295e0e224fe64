"""Body, spine and abdominal organs of a synthetic contrast-enhanced CT.

Used by :mod:`kits_keras.synthetic.cases`; kidneys and tumours are painted
there, after everything here. Values are Hounsfield units of a portal-venous
phase scan; each case draws its own enhancement so that liver, spleen, bowel and
vessels overlap the kidney and tumour intensities (a network has to use shape
and context, not a HU threshold). Coordinates are the patient frame of
:mod:`kits_keras.synthetic.shapes` (mm; origin at the spine, kidney level).
"""

import numpy as np

from kits_keras.synthetic.shapes import Blob
from kits_keras.synthetic.shapes import blob_field
from kits_keras.synthetic.shapes import blob_distance
from kits_keras.synthetic.shapes import box_shape
from kits_keras.synthetic.shapes import paint
from kits_keras.synthetic.shapes import random_bumps
from kits_keras.synthetic.shapes import rotation
from kits_keras.synthetic.shapes import smooth_noise

AIR = -1000.0
_CHUNK = 32  # slices per step for whole-volume operations (bounds memory)


def sample_body(rng, kidney_extent=None, fov_mm=None):
    """Body outline in the frame: lateral and AP half-axes, centre, fat.

    Args:
        kidney_extent: optional (max |l|, max p) in mm of real kidney labels
            that the body has to contain.
        fov_mm: optional in-plane field of view; scanners reconstruct a
            field of view that fits the patient, so the body fills most of it.
    """
    lateral = rng.uniform(135.0, 185.0)
    if fov_mm is not None:
        lateral = float(np.clip(fov_mm / 2 * rng.uniform(0.6, 0.92),
                                120.0, 200.0))
    fat = rng.uniform(10.0, 40.0)
    # Behind the spine: arch and paraspinal muscles (~80 mm), then fat.
    posterior_edge = rng.uniform(84.0, 96.0) + fat * 0.7
    if kidney_extent is not None:
        lateral = max(lateral, kidney_extent[0] + fat + 35.0)
        posterior_edge = max(posterior_edge, kidney_extent[1] + fat + 30.0)
    ap = rng.uniform(0.68, 0.82) * lateral
    return {
        "lateral": lateral,
        "ap": ap,
        "centre_p": posterior_edge - ap,
        "fat": fat,
        "muscle": rng.uniform(8.0, 14.0),
        "wobble": rng.uniform(0.0, 2 * np.pi, 2),
        "table": sample_table(rng),
    }


# Contrast phases of abdominal CT and how often each is drawn. KiTS19 is
# mostly late arterial / portal venous, but a toolkit meets every phase.
PHASES = ("non-contrast", "arterial", "portal-venous", "nephrographic")
_PHASE_P = (0.15, 0.25, 0.4, 0.2)


def sample_tissue(rng, phase=None):
    """Per-case HU of each tissue for a random contrast phase.

    Args:
        rng: np.random.Generator.
        phase: one of ``PHASES``, or None to draw one.

    Returns:
        dict tissue name -> HU, with ``"phase"`` naming the phase. Renal
        cortex and the blood pool enhance together (same bolus); without
        contrast every soft tissue sits at 30-65 HU and only shape and
        context tell kidney from liver, spleen, bowel and muscle.
    """
    phase = phase or str(rng.choice(PHASES, p=_PHASE_P))
    if phase == "non-contrast":
        cortex = rng.uniform(28.0, 45.0)
        blood = rng.uniform(35.0, 50.0)
        liver, spleen = rng.uniform(48.0, 65.0), rng.uniform(40.0, 55.0)
    elif phase == "arterial":
        cortex = rng.uniform(150.0, 260.0)
        blood = rng.uniform(220.0, 400.0)
        liver, spleen = rng.uniform(60.0, 90.0), rng.uniform(90.0, 160.0)
    elif phase == "portal-venous":
        cortex = rng.uniform(140.0, 200.0)
        blood = cortex + rng.uniform(-30.0, 25.0)
        liver, spleen = rng.uniform(70.0, 125.0), rng.uniform(95.0, 150.0)
    elif phase == "nephrographic":
        cortex = rng.uniform(140.0, 210.0)
        blood = rng.uniform(110.0, 170.0)
        liver, spleen = rng.uniform(85.0, 120.0), rng.uniform(95.0, 130.0)
    else:
        raise ValueError(f"phase must be one of {PHASES}. Received: {phase}")
    return {
        "phase": phase,
        "cortex": cortex,
        "fat": rng.uniform(-120.0, -80.0),
        "muscle": rng.uniform(35.0, 65.0),
        "liver": liver,
        "spleen": spleen,
        "aorta": blood,
        "ivc": blood - rng.uniform(0.0, 50.0) if phase != "arterial"
        else rng.uniform(60.0, 110.0),
        "bone": rng.uniform(500.0, 1000.0),
        "marrow": rng.uniform(150.0, 320.0),
        "disc": rng.uniform(70.0, 100.0),
        "csf": rng.uniform(5.0, 20.0),
        "bowel_wall": rng.uniform(35.0, 90.0),
        "fluid": rng.uniform(0.0, 30.0),
        "lung": rng.uniform(-900.0, -800.0),
    }


def _body_masks(s, p, l, body):
    """Skin, muscle-wall and cavity masks of a slab (ellipses per slice)."""
    wob = body["wobble"]
    # The waist changes slowly along the body axis.
    grow = 1.0 + 0.05 * np.sin(s / 90.0 + wob[0]) + 0.03 * np.cos(
        s / 47.0 + wob[1])
    a = body["lateral"] * grow
    b = body["ap"] * grow
    dp = p - body["centre_p"]
    # Flatter back (patient lies on the table): squash the posterior half.
    dp = np.where(dp > 0, dp * 1.12, dp)
    out = []
    for inset in (0.0, body["fat"], body["fat"] + body["muscle"]):
        out.append((l / (a - inset)) ** 2 + (dp / (b - inset)) ** 2 < 1.0)
    return out


def paint_body(image, grid, body, tissue, rng):
    """Air, skin/fat, abdominal wall muscle and visceral fat; the table."""
    nz = grid.shape[0]
    for start in range(0, nz, _CHUNK):
        box = (slice(start, min(start + _CHUNK, nz)), slice(None), slice(None))
        box = tuple(slice(b.start or 0, b.stop or n)
                    for b, n in zip(box, grid.shape))
        s, p, l = grid.coords(box)
        skin, wall, cavity = _body_masks(s, p, l, body)
        slab = image[box]
        slab[skin] = tissue["fat"]
        slab[wall & ~cavity] = tissue["muscle"]
        slab[cavity] = tissue["fat"] + 15.0
        paint_table(slab, p, l, skin, body)


def sample_table(rng):
    """CT table under the patient: absent in 1 of 10 cases, else a curved
    dense shell (or a flat plate) over a low-density core, a gap and a
    pad between it and the back."""
    if rng.random() < 0.1:
        return None
    return {
        "gap": rng.uniform(0.0, 15.0),
        "shell": rng.uniform(2.0, 5.0),
        "core": rng.uniform(8.0, 40.0),
        "shell_hu": rng.uniform(100.0, 600.0),
        "core_hu": rng.uniform(-700.0, -200.0),
        "pad_hu": rng.uniform(-950.0, -600.0),  # foam mattress
        "curvature": rng.uniform(0.0, 1.0 / 1500.0),
        "half_width": rng.uniform(180.0, 260.0),
    }


def paint_table(slab, p, l, skin, body):
    """Paints the table (``body["table"]``) into one slab outside the body.

    ``p``/``l`` are the slab's frame coordinates (mm); the table's top
    follows the back's lowest point and curves up towards the sides.
    """
    table = body.get("table")
    if table is None:
        return
    top = body["centre_p"] + body["ap"] / 1.12 + table["gap"] - (
        table["curvature"] * l ** 2)
    width = np.abs(l) < table["half_width"]
    layers = ((0.0, table["gap"], table["pad_hu"]),
              (table["gap"], table["gap"] + table["shell"],
               table["shell_hu"]),
              (table["gap"] + table["shell"],
               table["gap"] + table["shell"] + table["core"],
               table["core_hu"]),
              (table["gap"] + table["shell"] + table["core"],
               table["gap"] + 2 * table["shell"] + table["core"],
               table["shell_hu"]))
    for lo, hi, value in layers:
        layer = (p > top - table["gap"] + lo) & (p <= top - table["gap"] + hi)
        slab[np.broadcast_to(layer & width, slab.shape) & ~skin] = value


def cavity_test(grid, body):
    """Callable box -> mask of the abdominal cavity (organs stay inside)."""

    def inside(box):
        s, p, l = grid.coords(box)
        return _body_masks(s, p, l, body)[2]

    return inside


def paint_spine(image, grid, tissue, rng):
    """Vertebrae (cortical rim, marrow), discs, canal, posterior elements."""
    s_top, _, _ = grid.to_frame((0, 0, 0))
    s_bottom, _, _ = grid.to_frame((grid.shape[0] - 1, 0, 0))
    pitch = rng.uniform(30.0, 36.0)
    phase = rng.uniform(0, pitch)
    for s_c in np.arange(s_bottom - pitch + phase, s_top + pitch, pitch):
        tilt = rotation(angles=(rng.normal(0, 0.05), rng.normal(0, 0.05), 0))
        growth = 1.0 + max(0.0, -s_c) / 600.0  # lumbar bodies are larger
        body = Blob((s_c, 0.0, 0.0),
                    (pitch * 0.37, 16.0 * growth, 20.0 * growth), tilt,
                    random_bumps(rng, 2, 0.04))
        bone = tissue["bone"]
        marrow = tissue["marrow"] + rng.uniform(-30, 30)
        paint(image, grid, body,
              lambda box, d, u: np.where(d > 0.84, bone, marrow))
        paint(image, grid, Blob((s_c + pitch / 2, 0.0, 0.0),
                                (pitch * 0.12, 15.0 * growth, 19.0 * growth),
                                tilt), tissue["disc"])
        # Neural arch (a ring around the canal), spinous and transverse
        # processes: thin cortical bone around marrow.
        shell = lambda box, d, u: np.where(d > 0.6, bone * 0.7, marrow)
        paint(image, grid, Blob((s_c, 29.0, 0.0), (pitch * 0.28, 13.0, 14.0)),
              shell)
        paint(image, grid, Blob((s_c - 6, 48.0, 0.0),
                                (pitch * 0.28, 12.0, 4.0)), shell)
        for side in (-1, 1):
            paint(image, grid, Blob((s_c, 22.0, side * 26.0),
                                    (pitch * 0.12, 4.5, 16.0)), shell)
    paint(image, grid, Blob((0.0, 30.0, 0.0), (2000.0, 8.0, 10.0)),
          tissue["csf"])


def paint_ribs(image, grid, body, tissue, rng):
    """Lower ribs: bony arcs in the body wall from the spine round the
    flank, descending as they run forward (ribs 8-12 cover the upper
    poles of the kidneys, a classic false-positive site)."""
    lat, ap, centre_p = body["lateral"], body["ap"], body["centre_p"]
    inset = body["fat"] + body["muscle"] * 0.5
    a, b = lat - inset, ap - inset
    pitch = rng.uniform(22.0, 30.0)
    lowest = rng.uniform(-40.0, 0.0)  # the 12th rib's head, near the kidneys
    bone = tissue["bone"] * rng.uniform(0.5, 0.8)
    for level in range(5):
        s_head = lowest + level * pitch
        for side in (-1, 1):
            # Angle 0 = straight lateral; positive = towards the back.
            start = rng.uniform(55.0, 75.0)
            end = rng.uniform(-30.0, 10.0) if level < 2 else rng.uniform(
                -60.0, -20.0)
            for t in np.radians(np.arange(start, end, -2.5)):
                drop = (np.radians(start) - t) * rng.uniform(14.0, 22.0)
                centre = (s_head - drop, centre_p + b * np.sin(t),
                          side * a * np.cos(t))
                paint(image, grid, Blob(centre, (5.0, 5.5, 5.5)), bone)


def paint_muscles(image, grid, tissue, rng):
    """Psoas (grows towards the pelvis) and paraspinal muscles."""
    value = tissue["muscle"]
    for side in (-1, 1):
        for s_c in np.arange(-260.0, 60.0, 20.0):
            r = 9.0 + max(0.0, -s_c) * 0.08
            paint(image, grid, Blob(
                (s_c, 8.0 - max(0.0, -s_c) * 0.05,
                 side * (24.0 + max(0.0, -s_c) * 0.1)),
                (16.0, r, r * 1.1)), value)
        paint(image, grid, Blob((0.0, 52.0, side * 30.0),
                                (2000.0, 24.0, 22.0)), value)


def paint_vessels(image, grid, tissue, rng):
    """Aorta left of the midline with its bifurcation, IVC on the right."""
    bif = rng.uniform(-130.0, -90.0)
    r = rng.uniform(9.0, 13.0)
    paint(image, grid, Blob((bif + 400.0, -26.0, 10.0), (400.0, r, r)),
          tissue["aorta"])
    for side in (-1, 1):
        paint(image, grid, Blob(
            (bif - 90.0, -20.0, side * 32.0), (92.0, r * 0.65, r * 0.65),
            rotation(angles=(0, 0, -side * 0.25))), tissue["aorta"])
    paint(image, grid, Blob((bif + 380.0, -24.0, -24.0),
                            (400.0, 9.0, 13.0)), tissue["ivc"])


def _textured(rng, grid, mean, amplitude, scale_mm):
    def fill(box, d, u):
        noise = smooth_noise(rng, box_shape(box), grid.spacing, scale_mm)
        return mean + amplitude * noise

    return fill


def paint_organs(image, grid, body, tissue, rng):
    """Liver (right, with gallbladder), spleen (left), lungs, bowel."""
    inside = cavity_test(grid, body)
    lat = body["lateral"]
    liver = Blob((rng.uniform(65, 95), rng.uniform(-40, -15),
                  -lat * rng.uniform(0.4, 0.5)),
                 (rng.uniform(90, 115), rng.uniform(65, 85),
                  lat * rng.uniform(0.45, 0.58)),
                 rotation(angles=(rng.normal(0, 0.2), rng.normal(0, 0.15),
                                  rng.normal(0, 0.1))),
                 random_bumps(rng, 4, 0.14))
    paint(image, grid, liver,
          _textured(rng, grid, tissue["liver"], 4.0, 12.0), where=inside)
    # Hepatic veins / portal branches: bright tubes inside the liver.
    for _ in range(4):
        vessel = Blob(tuple(np.add(liver.centre, rng.normal(0, 25, 3))),
                      (rng.uniform(30, 60), 3.5, 3.5), rotation(rng))
        paint(image, grid, vessel, tissue["ivc"] - 10.0,
              where=lambda box: blob_distance(grid, liver, box)[0] < 0.9)
    # Hypodense liver lesions (cysts, metastases): round, kidney-tumour-
    # like intensities in the wrong organ.
    for _ in range(int(rng.integers(0, 4))):
        lesion = Blob(tuple(np.add(liver.centre, rng.normal(0, 30, 3))),
                      tuple(rng.uniform(5.0, 18.0, 3)), rotation(rng))
        paint(image, grid, lesion,
              tissue["liver"] - rng.uniform(20.0, 80.0),
              where=lambda box: blob_distance(grid, liver, box)[0] < 0.85)
    if rng.random() < 0.6:
        paint(image, grid, Blob((liver.centre[0] - 60, -70.0,
                                 liver.centre[2] + 20),
                                (30.0, 14.0, 14.0), rotation(rng)),
              tissue["fluid"], where=inside)
    spleen = Blob((rng.uniform(45, 75), rng.uniform(15, 35),
                   lat * rng.uniform(0.5, 0.62)),
                  (rng.uniform(45, 65), rng.uniform(38, 48),
                   rng.uniform(18, 26)),
                  rotation(angles=(rng.uniform(-0.6, -0.3), 0.1, 0.0)),
                  random_bumps(rng, 3, 0.1))
    paint(image, grid, spleen,
          _textured(rng, grid, tissue["spleen"], 4.0, 10.0), where=inside)
    for side in (-1, 1):
        paint(image, grid, Blob((rng.uniform(190, 220), 10.0,
                                 side * lat * 0.5),
                                (100.0, 80.0, lat * 0.42),
                                bumps=random_bumps(rng, 3, 0.06)),
              _textured(rng, grid, tissue["lung"], 25.0, 8.0), where=inside)
    paint_bowel(image, grid, body, tissue, rng, inside)


def paint_bowel(image, grid, body, tissue, rng, inside):
    """Bowel loops in front: walls with fluid, gas or oral contrast."""
    lat = body["lateral"]
    s_top = grid.to_frame((0, 0, 0))[0]
    s_bottom = grid.to_frame((grid.shape[0] - 1, 0, 0))[0]
    s_lo, s_hi = max(s_bottom, -250.0), min(s_top, 60.0)
    count = int(np.clip((s_hi - s_lo) / 5.0, 8, 50))
    for _ in range(count):
        centre = (rng.uniform(s_lo, s_hi), rng.uniform(-150, -30),
                  rng.uniform(-0.75, 0.75) * lat)
        r = rng.uniform(10.0, 22.0)
        loop = Blob(centre, (r * rng.uniform(1.0, 2.5), r, r), rotation(rng),
                    random_bumps(rng, 3, 0.1))
        content = rng.choice(["fluid", "gas", "contrast", "mixed"],
                             p=[0.4, 0.25, 0.15, 0.2])
        fill = {"fluid": tissue["fluid"], "gas": AIR * 0.95,
                "contrast": rng.uniform(180.0, 320.0),
                "mixed": rng.uniform(-20.0, 40.0)}[content]
        field = blob_field(grid, loop)
        if field is None:
            continue
        box, d, _ = field
        target = image[box]
        # Loops fill the fat between organs; they never overwrite an organ.
        free = (d < 1.0) & (target < 20.0) & (target > -200.0)
        if not free.any():
            continue
        free &= inside(box)
        target[free] = tissue["bowel_wall"]
        target[free & (d < 0.75)] = fill


def finish(image, grid, rng, noise_hu, blur_mm):
    """In-plane blur with correlated noise, then HU rounding and clipping.

    White noise is added before the blur, which makes it spatially
    correlated like reconstructed CT noise; its level is raised so that the
    final standard deviation is about ``noise_hu``.
    """
    from scipy import ndimage

    sigma = [0.0] + [blur_mm / sp for sp in grid.spacing[1:]]
    # Std of white noise after a 2-D Gaussian blur of sigma s voxels is
    # 1 / (2 sqrt(pi) s) times the input's (for s >~ 0.5).
    gain = max(2.0 * np.sqrt(np.pi) * np.sqrt(sigma[1] * sigma[2]), 1.0)
    for start in range(0, grid.shape[0], _CHUNK):
        slab = image[start:start + _CHUNK]
        slab += rng.standard_normal(slab.shape, dtype=np.float32) * (
            noise_hu * gain)
        slab[...] = ndimage.gaussian_filter(slab, sigma, mode="nearest")
        np.clip(np.rint(slab), -1024.0, 3071.0, out=slab)
    return image
