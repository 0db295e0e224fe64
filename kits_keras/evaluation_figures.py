"""Figures of an evaluation report: the box plot of per-case scores and
the best/median/worst overlays (:func:`kits_keras.evaluate.write_report`).

``metric`` is a :class:`kits_keras.evaluate.Metric`: which scores are boxed
and titled, the label values and the outline colours.
"""

import os

import numpy as np

from kits_keras import files
from kits_keras import io
from kits_keras import viz


def save_boxplot(report, path, metric):
    """Box plot of the per-case scores (KiTS19: kidney, tumour and
    composite Dice, cf. Fig. 5)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [key for key, _ in metric.boxes]
    data = [[r[k] for r in report["cases"]] for k in keys]
    fig = Figure(figsize=(max(5.0, 1.1 * len(keys) + 1.7), 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(keys) + 1),
                  [label for _, label in metric.boxes])
    rng = np.random.default_rng(0)
    for i, values in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.08, 0.08, len(values)), values, s=9,
                   alpha=0.6, color="k", zorder=3)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice per case" if metric.name == "kits19"
                  else "score per case")
    ax.set_title(f"{report['num_cases']} cases: "
                 + _named_scores(report["mean"], metric), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _named_scores(scores, metric):
    """``kidney 0.812, tumour 0.534`` for the metric's title keys."""
    return ", ".join(f"{label} {scores[key]:.3f}"
                     for key, label in metric.title_keys)


def save_overlay(row, path, metric, rank=""):
    """Orthogonal views through the tumour: truth and prediction outlined
    (cf. Fig. 4). The CT is used when ``imaging.nii.gz`` lies beside the
    ground truth, else the truth labels are drawn on a blank background."""
    truth = io.read_labels(row["truth"], label_values=metric.label_values)
    pred = io.read_labels(row["prediction"],
                          label_values=metric.label_values)
    image_path = os.path.join(os.path.dirname(row["truth"]), io.IMAGE_FILE)
    window = viz.CT_WINDOW
    # Only a case folder's own CT (a flat truth file has none); its grid was
    # checked by evaluate_case.
    if (os.path.basename(row["truth"]) == io.LABELS_FILE
            and os.path.isfile(image_path)):
        image = io.read_image(image_path).array
    else:
        image, window = np.zeros(truth.array.shape, np.float32), None
    title = f"{rank} {row['case_id']}: {_named_scores(row, metric)}"
    truth_colours, prediction_colours = metric.colours
    return viz.save_orthogonal_views(
        path, image, truth.spacing,
        overlays=[(truth.array, truth_colours, "truth"),
                  (pred.array, prediction_colours, "prediction")],
        title=title, window=window)
