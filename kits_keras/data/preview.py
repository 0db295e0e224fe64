"""A PNG grid of augmented training patches, to see what the network sees.

Each patch shows its central axial slice above its central coronal plane,
with kidney (yellow) and tumour (red) label outlines and the way it was
sampled (random, kidney, tumour). Pixel aspect follows the voxel spacing.
"""

import numpy as np

from kits_keras import files

from kits_keras.viz import LABEL_COLOURS
from kits_keras.viz import draw_outlines

KIND_NAMES = ("random", "foreground", "tumour")


def collect_patches(config, data_dir, num, seed=None):
    """``num`` training patches as numpy: (images, labels, kinds, spacing).

    images float32 (num, z, y, x); labels int32 (num, z, y, x); kinds int.
    """
    from kits_keras.data import pipeline as data
    from kits_keras.data import prepared

    seed = config.train.seed if seed is None else int(seed)
    volumes = prepared.volume_dataset(config, data_dir, "train", shuffle=True,
                                   seed=seed)
    patches = data.patch_dataset(volumes, config, seed, training=True,
                                 with_kind=True)
    images, labels, kinds = [], [], []
    for image, pyramid, kind in patches.take(num).as_numpy_iterator():
        images.append(image[..., 0])
        labels.append(pyramid[0])
        kinds.append(int(kind))
    return np.stack(images), np.stack(labels), kinds, config.data.target_spacing


def save_patch_grid(path, images, labels, spacing, kinds=None, title="",
                    columns=4):
    """Writes the grid PNG (atomically) and returns ``path``.

    Args:
        path: str. Destination ``.png``.
        images: (n, z, y, x) normalised intensities.
        labels: (n, z, y, x) ints in {0, 1, 2}.
        spacing: (z, y, x) mm.
        kinds: optional sampling kind per patch (0 random, 1 foreground,
            2 tumour).
        title: str. Figure title.
        columns: patches per row.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.shape != labels.shape:
        raise ValueError(
            "images and labels must both be (n, z, y, x). Received: "
            f"{images.shape} and {labels.shape}"
        )
    n, nz, ny, nx = images.shape
    sz, sy, sx = (float(s) for s in spacing)
    columns = max(1, min(columns, n))
    fig, grid = _grid_figure(images.shape, (sz, sy, sx), columns)
    vmin, vmax = np.percentile(images, (1.0, 99.0))
    for i in range(n):
        row, col = divmod(i, columns)
        axes = [fig.add_subplot(grid[2 * row + j, col]) for j in range(2)]
        _draw_patch(axes, images[i], labels[i], (sz, sy, sx), (vmin, vmax))
        kind = "" if kinds is None else KIND_NAMES[kinds[i]]
        share = 100.0 * float((labels[i] > 0).mean())
        axes[0].set_title(f"#{i} {kind} fg {share:.1f}%", fontsize=7)
    fig.suptitle(
        f"{title}  patch {nz}x{ny}x{nx} at {sz:g}x{sy:.2f}x{sx:.2f} mm; "
        "axial (top) and coronal (bottom) centre planes; kidney yellow, "
        "tumour red".strip(), fontsize=8, x=0.01, ha="left")
    return files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _grid_figure(shape, spacing, columns):
    """``(figure, gridspec)`` of two rows (axial over coronal) per row of
    ``columns`` patches of ``shape`` (n, z, y, x) at ``spacing`` mm."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n, nz, ny, nx = shape
    sz, sy, sx = spacing
    rows = -(-n // columns)
    # Panel heights in mm: axial ny * sy, coronal nz * sz.
    width_mm = nx * sx
    heights = [ny * sy, nz * sz] * rows
    scale = 2.6 / width_mm
    fig = Figure(figsize=(2.6 * columns + 0.2,
                          scale * sum(heights) + 0.35 * rows + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 * rows, columns, height_ratios=heights,
                            hspace=0.12, wspace=0.03, left=0.01, right=0.99,
                            bottom=0.01, top=0.94)
    return fig, grid


def _draw_patch(axes, image, labels, spacing, limits):
    """Central axial and coronal planes of one (z, y, x) patch on ``axes``
    (two), with label outlines."""
    nz, ny, _ = image.shape
    sz, sy, sx = spacing
    planes = (
        (image[nz // 2], labels[nz // 2], sy / sx),
        (image[:, ny // 2], labels[:, ny // 2], sz / sx),
    )
    for ax, (plane, label, aspect) in zip(axes, planes):
        ax.imshow(plane, cmap="gray", vmin=limits[0], vmax=limits[1],
                  aspect=aspect, interpolation="nearest")
        draw_outlines(ax, label, LABEL_COLOURS, linewidth=0.8)
        ax.set_axis_off()


def save_training_batch_preview(path, config, data_dir, num=8, seed=None):
    """``num`` augmented training patches of ``config`` as a PNG grid."""
    images, labels, kinds, spacing = collect_patches(config, data_dir, num,
                                                     seed)
    return save_patch_grid(path, images, labels, spacing, kinds,
                           title=f"{config.name} ({config.data.dataset})")
