"""KiTS19 evaluation: kidney and tumour Dice per case, tables and figures.

The official KiTS19 metric (Heller et al., Medical Image Analysis 2021):
kidney Dice is computed on ``label > 0`` (kidney and tumour together),
tumour Dice on ``label > 1``; the composite score is their mean, per case,
and the challenge score is the mean over cases.

Conventions (where the challenge code is silent):

* When prediction and ground truth are both empty for a class, Dice = 1
  (nothing to find, nothing found); one empty and the other not gives 0.
* A ground-truth case without a prediction is reported as ``missing`` and
  scores 0 for both classes, so it counts against the mean.
* A prediction on another grid (shape or affine) or an unreadable file is an
  ``error`` for that case, also scored 0.
"""

import csv
import logging
import os
import re

import numpy as np

from kits_keras import io

log = logging.getLogger(__name__)

EMPTY_DICE = 1.0
_CASE_ID = re.compile(r"(?:case|prediction)_(\d{5})")
FIELDS = ("case_id", "kidney_dice", "tumour_dice", "composite", "status",
          "error")
TRUTH_COLOURS = {1: "#ffd21f", 2: "#ff3030"}
PREDICTION_COLOURS = {1: "#2fa4ff", 2: "#3cff5a"}


def dice(pred, truth):
    """Dice of two boolean masks; :data:`EMPTY_DICE` when both are empty.

    Example:
        >>> dice(np.array([1, 1, 0], bool), np.array([1, 0, 0], bool))
        0.6666666666666666
    """
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(truth))
    if total == 0:
        return EMPTY_DICE
    return 2.0 * int(np.count_nonzero(pred & truth)) / total


def kits_scores(pred, truth):
    """Kidney (label > 0), tumour (label > 1) and composite Dice."""
    kidney = dice(pred > 0, truth > 0)
    tumour = dice(pred > 1, truth > 1)
    return {"kidney_dice": kidney, "tumour_dice": tumour,
            "composite": (kidney + tumour) / 2.0}


def case_id_of(name):
    """``case_00012`` from a folder or file name (``prediction_00012``,
    ``case_00012_seg.nii.gz``); the file stem when there is no number."""
    match = _CASE_ID.search(os.path.basename(name))
    if match:
        return f"case_{match.group(1)}"
    return io.nifti_stem(name)


def find_segmentations(folder):
    """``{case_id: path}`` for KiTS19 case folders or flat NIfTI files.

    Hidden names (a dot first: temporaries of an interrupted write, editor
    and OS files) are skipped.

    Raises:
        CaseError: the folder is missing, or two files give one case id
            (``case_00001.nii.gz`` and ``prediction_00001.nii.gz``, a case
            folder and a flat file, ``.nii`` and ``.nii.gz``); the message
            names both.
    """
    if not os.path.isdir(folder):
        raise io.CaseError(f"{folder}: folder not found")
    found = {}
    for name in sorted(os.listdir(folder)):
        if io.is_hidden(name):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            labels = os.path.join(path, io.LABELS_FILE)
            if not os.path.isfile(labels):
                continue
            path = labels
        elif not io.is_nifti(name) or name == io.IMAGE_FILE:
            continue
        case_id = case_id_of(name)
        if case_id in found:
            raise io.CaseError(
                f"{found[case_id]} and {path}: both are {case_id}; keep one "
                "(which one to score is ambiguous)")
        found[case_id] = path
    return found


def check_ct_grid(truth_path):
    """Raises CaseError if the case folder's CT is on another grid than its
    ground truth (header only; a flat truth file has no CT)."""
    if os.path.basename(truth_path) != io.LABELS_FILE:
        return
    image_path = os.path.join(os.path.dirname(truth_path), io.IMAGE_FILE)
    if not os.path.isfile(image_path):
        return
    import nibabel as nib

    try:
        image, truth = nib.load(image_path), nib.load(truth_path)
        shapes = tuple(image.shape[:3]), tuple(truth.shape[:3])
        same = shapes[0] == shapes[1] and np.allclose(
            image.affine, truth.affine, rtol=1e-4, atol=1e-3)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise io.CaseError(f"{image_path}: cannot read NIfTI header "
                           f"({io.first_line(err)})") from None
    if not same:
        raise io.CaseError(
            f"{image_path}: shape {shapes[0]} / affine do not match "
            f"{truth_path} {shapes[1]}; the CT belongs to another grid")


def evaluate_case(pred_path, truth_path):
    """Scores one prediction file against its ground truth file."""
    check_ct_grid(truth_path)
    truth = io.read_labels(truth_path)
    pred = io.read_labels(pred_path)
    io.check_same_grid(truth, pred)
    return kits_scores(pred.array, truth.array)


def evaluate_folders(pred_dir, truth_dir):
    """Scores every ground-truth case; returns the report dict.

    Returns:
        dict with ``cases`` (one row per ground-truth case: the
        :data:`FIELDS`, plus ``prediction`` and ``truth`` paths), ``mean``
        (means over all ground-truth cases, missing and errors as 0),
        ``missing``, ``errors``, ``extra`` (predictions without truth) and
        ``conventions``.
    """
    truths = find_segmentations(truth_dir)
    if not truths:
        raise io.CaseError(f"{truth_dir}: no ground-truth segmentations "
                           "(case_XXXXX/segmentation.nii.gz or "
                           "case_XXXXX.nii.gz)")
    preds = find_segmentations(pred_dir)
    if not preds:
        raise io.CaseError(f"{pred_dir}: no predictions (case_XXXXX.nii.gz, "
                           "prediction_XXXXX.nii.gz or case folders)")
    if not set(preds) & set(truths):
        raise io.CaseError(
            f"{pred_dir}: no prediction matches a ground-truth case of "
            f"{truth_dir} (predictions: {', '.join(sorted(preds)[:3])}...)")
    rows = []
    for case_id, truth_path in truths.items():
        row = {"case_id": case_id, "kidney_dice": 0.0, "tumour_dice": 0.0,
               "composite": 0.0, "status": "ok", "error": "",
               "truth": truth_path, "prediction": preds.get(case_id)}
        if row["prediction"] is None:
            row.update(status="missing", error="no prediction")
            log.warning("%s: no prediction in %s, scored 0", case_id,
                        pred_dir)
        else:
            try:
                row.update(evaluate_case(row["prediction"], truth_path))
            except (io.CaseError, ValueError, OSError) as err:
                row.update(status="error", error=str(err))
                log.error("%s: %s", case_id, err)
        rows.append(row)
    mean = {key: float(np.mean([r[key] for r in rows]))
            for key in ("kidney_dice", "tumour_dice", "composite")}
    return {
        "cases": rows,
        "mean": mean,
        "num_cases": len(rows),
        "missing": [r["case_id"] for r in rows if r["status"] == "missing"],
        "errors": [r["case_id"] for r in rows if r["status"] == "error"],
        "extra": sorted(set(preds) - set(truths)),
        "conventions": {
            "kidney": "Dice over label > 0 (kidney + tumour)",
            "tumour": "Dice over label > 1",
            "composite": "mean of kidney and tumour Dice",
            "both_empty": EMPTY_DICE,
            "missing_or_error": 0.0,
        },
    }


def format_table(report):
    """The per-case scores and the mean as a fixed-width text table."""
    lines = [f"{'case':<12} {'kidney':>7} {'tumour':>7} {'mean':>7}  status"]
    for r in report["cases"]:
        lines.append(f"{r['case_id']:<12} {r['kidney_dice']:7.4f} "
                     f"{r['tumour_dice']:7.4f} {r['composite']:7.4f}  "
                     f"{r['status']}")
    m = report["mean"]
    lines.append(f"{'mean':<12} {m['kidney_dice']:7.4f} "
                 f"{m['tumour_dice']:7.4f} {m['composite']:7.4f}  "
                 f"({report['num_cases']} cases)")
    return "\n".join(lines)


REPORT_FILES = ("scores.json", "scores.csv", "dice_boxplot.png")
_OVERLAY = re.compile(r"^overlay_(best|median|worst)_.+\.png$")


def existing_report_files(out_dir):
    """Files of an earlier report in ``out_dir`` (scores, plots)."""
    if not os.path.isdir(out_dir):
        return []
    return [os.path.join(out_dir, name) for name in sorted(os.listdir(out_dir))
            if name in REPORT_FILES or _OVERLAY.match(name)]


def write_report(report, out_dir):
    """Writes ``scores.json``, ``scores.csv``, ``dice_boxplot.png`` and the
    best/median/worst overlays into ``out_dir``; returns their paths.

    Overlays of an earlier report that this one does not rewrite are
    removed (they would show other cases under the same ranks)."""
    os.makedirs(out_dir, exist_ok=True)
    for stale in io.sweep_temporaries(out_dir):
        log.info("Removed %s (left by an interrupted run)", stale)
    earlier = existing_report_files(out_dir)
    paths = {"json": os.path.join(out_dir, "scores.json"),
             "csv": os.path.join(out_dir, "scores.csv")}

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(report["cases"])

    io.write_json(paths["json"], report)
    io.atomic_write(paths["csv"], write_csv)
    paths["boxplot"] = save_boxplot(
        report, os.path.join(out_dir, "dice_boxplot.png"))
    for rank, row in pick_examples(report).items():
        path = os.path.join(out_dir, f"overlay_{rank}_{row['case_id']}.png")
        paths[f"overlay_{rank}"] = save_overlay(row, path, rank)
    for path in set(earlier) - set(paths.values()):
        os.remove(path)
    return paths


def pick_examples(report):
    """Best, median and worst scored case by composite Dice."""
    scored = sorted((r for r in report["cases"] if r["status"] == "ok"),
                    key=lambda r: r["composite"])
    if not scored:
        return {}
    return {"best": scored[-1], "median": scored[len(scored) // 2],
            "worst": scored[0]}


def save_boxplot(report, path):
    """Box plot of per-case kidney, tumour and composite Dice (cf. Fig. 5)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = ("kidney_dice", "tumour_dice", "composite")
    data = [[r[k] for r in report["cases"]] for k in keys]
    fig = Figure(figsize=(5.0, 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.boxplot(data, showmeans=True)
    ax.set_xticks([1, 2, 3], ["kidney", "tumour", "composite"])
    rng = np.random.default_rng(0)
    for i, values in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.08, 0.08, len(values)), values, s=9,
                   alpha=0.6, color="k", zorder=3)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice per case")
    m = report["mean"]
    ax.set_title(f"{report['num_cases']} cases: kidney {m['kidney_dice']:.3f}"
                 f", tumour {m['tumour_dice']:.3f}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def save_overlay(row, path, rank=""):
    """Orthogonal views through the tumour: truth and prediction outlined
    (cf. Fig. 4). The CT is used when ``imaging.nii.gz`` lies beside the
    ground truth, else the truth labels are drawn on a blank background."""
    from kits_keras import viz

    truth = io.read_labels(row["truth"])
    pred = io.read_labels(row["prediction"])
    image_path = os.path.join(os.path.dirname(row["truth"]), io.IMAGE_FILE)
    window = viz.CT_WINDOW
    # Only a case folder's own CT (a flat truth file has none); its grid was
    # checked by evaluate_case.
    if (os.path.basename(row["truth"]) == io.LABELS_FILE
            and os.path.isfile(image_path)):
        image = io.read_image(image_path).array
    else:
        image, window = np.zeros(truth.array.shape, np.float32), None
    title = (f"{rank} {row['case_id']}: kidney {row['kidney_dice']:.3f}, "
             f"tumour {row['tumour_dice']:.3f}")
    return viz.save_orthogonal_views(
        path, image, truth.spacing,
        overlays=[(truth.array, TRUTH_COLOURS, "truth"),
                  (pred.array, PREDICTION_COLOURS, "prediction")],
        title=title, window=window)


def evaluate(pred_dir, truth_dir, out_dir, overwrite=False):
    """``kits-keras evaluate``: scores, writes the report files, returns
    ``(report, paths)``.

    Raises:
        ValueError: before any work, when ``out_dir`` holds an earlier
            report and ``overwrite`` is False.
    """
    existing = existing_report_files(out_dir)
    if existing and not overwrite:
        raise ValueError(f"{existing[0]}: exists; pass --overwrite to "
                         "replace the report in "
                         f"{out_dir} ({len(existing)} files)")
    report = evaluate_folders(pred_dir, truth_dir)
    paths = write_report(report, out_dir)
    return report, paths
