"""PNG views of volumes: axial, coronal and sagittal planes with outlines.

Matplotlib runs on the Agg canvas directly (no pyplot state), so this works
headless and from threads. Files are written with :func:`files.atomic_write`.

Display convention for ``(z, y, x)`` arrays in the KiTS19 layout: axial
slices with the front of the patient at the top and the patient's right on
the viewer's left (radiological view), coronal and sagittal planes with the
head at the top. Pixel aspect follows the voxel spacing.
"""

import numpy as np
from scipy import ndimage

from kits_keras import files
from kits_keras import io

CT_WINDOW = (40.0, 400.0)  # (level, width) HU: abdominal soft tissue
LABEL_COLOURS = {1: "#ffd21f", 2: "#ff3030"}  # kidney yellow, tumour red
CYST_COLOUR = "#30c8ff"  # KiTS23's label 3, cyan


def label_colours(labels):
    """:data:`LABEL_COLOURS`, plus the cyst's when ``labels`` hold a 3
    (so KiTS19 figures and legends are unchanged)."""
    colours = dict(LABEL_COLOURS)
    if (np.asarray(labels) == 3).any():
        colours[3] = CYST_COLOUR
    return colours


def central_voxel(mask):
    """Voxel ``(z, y, x)`` of ``mask`` nearest the mask's centroid.

    Lies in the structure even when it is curved (a horseshoe kidney's
    centroid may not).
    """
    centre = np.array(ndimage.center_of_mass(mask))
    points = np.argwhere(mask)
    best = points[np.argmin(((points - centre) ** 2).sum(axis=1))]
    return tuple(int(v) for v in best)


def largest_component(mask):
    """The largest 26-connected component of a boolean ``mask`` (None when
    the mask is empty)."""
    comps, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return None
    sizes = ndimage.sum_labels(mask, comps, range(1, n + 1))
    return comps == int(np.argmax(sizes)) + 1


def default_center(image_shape, labels=None):
    """Voxel ``(z, y, x)`` through the largest tumour, else kidney.

    :func:`central_voxel` of the component; the volume centre without
    labels.
    """
    if labels is not None:
        for value in (2, 1):
            largest = largest_component(labels == value)
            if largest is not None:
                return central_voxel(largest)
    return tuple(int(n // 2) for n in image_shape)


def _window_limits(image, window):
    if window is None:
        # Normalised or unknown intensities: robust percentiles.
        sample = image[:: max(1, image.shape[0] // 32)]
        lo, hi = np.percentile(sample, (1.0, 99.0))
        return float(lo), float(max(hi, lo + 1e-6))
    level, width = window
    return level - width / 2.0, level + width / 2.0


def _planes(array, center):
    z, y, x = center
    return (array[z], array[:, y, :], array[:, :, x])


def save_orthogonal_views(path, image, spacing, overlays=None, center=None,
                          title="", window=CT_WINDOW):
    """Writes :func:`orthogonal_views_png` to ``path`` (atomically).

    Returns:
        str: ``path``.
    """
    png = orthogonal_views_png(image, spacing, overlays, center, title,
                               window)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(png)

    return files.atomic_write(path, write)


def orthogonal_views_png(image, spacing, overlays=None, center=None,
                         title="", window=CT_WINDOW):
    """PNG bytes of axial, coronal and sagittal planes of a volume.

    Args:
        image: ``(z, y, x)`` array, HU by default.
        spacing: ``(z, y, x)`` voxel size in mm (sets the pixel aspect).
        overlays: list of ``(label_array, {label: colour}, name)``; each
            label is drawn as an outline. Defaults to none.
        center: ``(z, y, x)`` voxel the planes pass through. Defaults to the
            largest tumour (else kidney) of the first overlay, else the
            volume centre.
        title: str. Figure title.
        window: ``(level, width)`` in the image's units, or None for the
            1st-99th percentiles (for normalised images). Defaults to the
            abdominal window 40/400 HU.

    Returns:
        bytes: the PNG file's content.
    """
    import io as pyio

    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be 3-D (z, y, x). Received: "
                         f"{image.shape}")
    overlays = list(overlays or [])
    if center is None:
        center = default_center(image.shape, overlays[0][0] if overlays
                                else None)
    center = tuple(int(np.clip(c, 0, n - 1))
                   for c, n in zip(center, image.shape))
    fig = _views_figure(image, spacing, overlays, center, window)
    sz, sy, sx = (float(v) for v in spacing)
    level_text = ("auto window" if window is None
                  else f"window {window[0]:g}/{window[1]:g}")
    fig.suptitle(f"{title}  spacing {sz:g}x{sy:.2f}x{sx:.2f} mm, "
                 f"{level_text}".strip(), fontsize=9, x=0.01, ha="left")
    buffer = pyio.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _views_figure(image, spacing, overlays, center, window):
    """The figure of :func:`orthogonal_views_png`, without its title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sz, sy, sx = (float(v) for v in spacing)
    vmin, vmax = _window_limits(image, window)
    # Physical (width, height) of each panel in mm.
    extents = [(image.shape[2] * sx, image.shape[1] * sy),
               (image.shape[2] * sx, image.shape[0] * sz),
               (image.shape[1] * sy, image.shape[0] * sz)]
    aspects = [sy / sx, sz / sx, sz / sy]
    height = max(e[1] for e in extents)
    fig = Figure(figsize=(4.2 * sum(e[0] for e in extents) / height + 0.4,
                          4.8), dpi=110)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 3, width_ratios=[e[0] for e in extents],
                            wspace=0.04, left=0.01, right=0.99, bottom=0.02,
                            top=0.86)
    image_planes = _planes(image, center)
    for i, name in enumerate(("axial", "coronal", "sagittal")):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(image_planes[i], cmap="gray", vmin=vmin, vmax=vmax,
                  aspect=aspects[i], interpolation="bilinear")
        for labels, colours, _ in overlays:
            draw_outlines(ax, _planes(np.asarray(labels), center)[i],
                          colours, linewidth=0.9)
        ax.set_title(f"{name} {center[i]}", fontsize=8)
        ax.set_axis_off()
    legend = _legend_handles(overlays)
    if legend:
        fig.legend(handles=legend, loc="upper right", fontsize=7, ncol=2,
                   frameon=False)
    return fig


def draw_outlines(ax, plane, colours, linewidth):
    """Draws each label of a 2-D ``plane`` as an outline on ``ax``.

    Args:
        ax: matplotlib Axes showing ``plane``.
        plane: 2-D integer label array.
        colours: dict. Label value -> matplotlib colour; a value absent
            from the plane, or filling all of it, has no outline.
        linewidth: float. Outline width in points.
    """
    for value, colour in colours.items():
        mask = (plane == value).astype(np.float32)
        if mask.any() and not mask.all():
            ax.contour(mask, levels=[0.5], colors=[colour],
                       linewidths=linewidth)


def _legend_handles(overlays):
    """One legend line per overlay and label (``"<overlay> <class>"``)."""
    from matplotlib.lines import Line2D

    legend = []
    for labels, colours, overlay_name in overlays:
        for value, colour in colours.items():
            # KiTS23's label 3 is a cyst; other values are shown as is.
            label = (io.CLASS_NAMES[value] if 0 <= value < 3
                     else "cyst" if value == 3 else value)
            legend.append(Line2D([0], [0], color=colour,
                                 label=f"{overlay_name} {label}"))
    return legend


def save_case_preview(path, case, window=CT_WINDOW):
    """Orthogonal views of an ``io.Case`` with its label outlines."""
    overlays = []
    if case.labels is not None:
        overlays = [(case.labels.array, label_colours(case.labels.array),
                     "label")]
    return save_orthogonal_views(path, case.image.array, case.spacing,
                                 overlays, title=case.case_id, window=window)
