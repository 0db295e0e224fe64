"""The loss-curve figure of a run (``RUN/loss_curves.png``), drawn from
its ``history.csv``: training and validation loss, and the moving average
of the validation Dice, like the paper's Fig. 3."""

import csv
import math
import os

import numpy as np

from kits_keras import files


def _column(rows, key):
    values = []
    for row in rows:
        try:
            values.append(float(row.get(key, "nan")))
        except ValueError:  # "NA" on epochs without validation
            values.append(math.nan)
    return np.asarray(values)


def plot_loss_curves(csv_path, png_path):
    """Draws the curves of a ``history.csv`` into ``png_path`` (atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    epochs = _column(rows, "epoch") + 1
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(epochs, _column(rows, "loss"), label="training loss")
    val_loss = _column(rows, "val_loss")
    ok = np.isfinite(val_loss)
    ax.plot(epochs[ok], val_loss[ok], label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    right = ax.twinx()
    ma = _column(rows, "val_dice_ma")
    ok = np.isfinite(ma)
    right.plot(epochs[ok], ma[ok], color="tab:green",
               label="validation Dice (moving average)")
    right.set_ylabel("mean kidney/tumour Dice")
    right.set_ylim(0.0, 1.0)
    handles = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], loc="center right")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(csv_path))))
    fig.tight_layout()
    files.atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
