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

``metric="kits23"`` scores KiTS23's hierarchical evaluation classes instead
(Dice and Surface Dice, :mod:`kits_keras.hec`), with the same folder
layouts, conventions and report files.
"""

import csv
import dataclasses
import logging
import os
import re

import numpy as np

from kits_keras import evaluation_figures as figures
from kits_keras import files
from kits_keras import io

log = logging.getLogger(__name__)

EMPTY_DICE = 1.0
_CASE_ID = re.compile(r"(?:case|prediction)_(\d{5})")
TRUTH_COLOURS = {1: "#ffd21f", 2: "#ff3030"}
PREDICTION_COLOURS = {1: "#2fa4ff", 2: "#3cff5a"}
METRIC_NAMES = ("kits19", "kits23")


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


@dataclasses.dataclass(frozen=True)
class Metric:
    """What one ``--metric`` scores and how its report is laid out.

    Attributes:
        name: str. ``kits19`` or ``kits23``.
        label_values: tuple of ints the label files may hold.
        score: ``(pred, truth, spacing_mm) -> {key: float}``, arrays
            ``(z, y, x)``, spacing ``(z, y, x)`` in mm.
        keys: the per-case score keys, in column order.
        columns: ``(key, header)`` pairs of the printed table.
        boxes: ``(key, label)`` pairs of the box plot.
        title_keys: ``(key, label)`` pairs named in figure titles.
        rank_key: key picking the best/median/worst overlays.
        colours: ``(truth, prediction)`` ``{label: colour}`` of overlays.
        conventions: dict written into the report.
    """

    name: str
    label_values: tuple
    score: object
    keys: tuple
    columns: tuple
    boxes: tuple
    title_keys: tuple
    rank_key: str
    colours: tuple
    conventions: dict

    @property
    def fields(self):
        return ("case_id", *self.keys, "status", "error")


def get_metric(name):
    """The :class:`Metric` called ``name`` (one of :data:`METRIC_NAMES`)."""
    if name == "kits19":
        return Metric(
            "kits19", io.LABEL_VALUES,
            lambda pred, truth, spacing: kits_scores(pred, truth),
            keys=("kidney_dice", "tumour_dice", "composite"),
            columns=(("kidney_dice", "kidney"), ("tumour_dice", "tumour"),
                     ("composite", "mean")),
            boxes=(("kidney_dice", "kidney"), ("tumour_dice", "tumour"),
                   ("composite", "composite")),
            title_keys=(("kidney_dice", "kidney"),
                        ("tumour_dice", "tumour")),
            rank_key="composite",
            colours=(TRUTH_COLOURS, PREDICTION_COLOURS),
            conventions={
                "kidney": "Dice over label > 0 (kidney + tumour)",
                "tumour": "Dice over label > 1",
                "composite": "mean of kidney and tumour Dice",
                "both_empty": EMPTY_DICE,
                "missing_or_error": 0.0,
            })
    if name == "kits23":
        from kits_keras import hec

        return hec.kits23_metric()
    raise ValueError(f"Unknown metric. Received: metric={name!r}; "
                     f"expected one of {METRIC_NAMES}")


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
        if files.is_hidden(name):
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
                           f"({files.first_line(err)})") from None
    if not same:
        raise io.CaseError(
            f"{image_path}: shape {shapes[0]} / affine do not match "
            f"{truth_path} {shapes[1]}; the CT belongs to another grid")


def evaluate_case(pred_path, truth_path, metric=None):
    """Scores one prediction file against its ground truth file
    (``metric``: a :class:`Metric`, KiTS19's by default)."""
    metric = metric or get_metric("kits19")
    check_ct_grid(truth_path)
    truth = io.read_labels(truth_path, label_values=metric.label_values)
    pred = io.read_labels(pred_path, label_values=metric.label_values)
    io.check_same_grid(truth, pred)
    return metric.score(pred.array, truth.array, truth.spacing)


def evaluate_folders(pred_dir, truth_dir, metric="kits19"):
    """Scores every ground-truth case; returns the report dict.

    Returns:
        dict with ``cases`` (one row per ground-truth case: the
        :attr:`Metric.fields`, plus ``prediction`` and ``truth`` paths), ``mean``
        (means over all ground-truth cases, missing and errors as 0),
        ``missing``, ``errors``, ``extra`` (predictions without truth) and
        ``conventions``; for ``metric="kits23"`` also ``metric``.
    """
    spec = get_metric(metric)
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
        row = {"case_id": case_id, **dict.fromkeys(spec.keys, 0.0),
               "status": "ok", "error": "", "truth": truth_path,
               "prediction": preds.get(case_id)}
        if row["prediction"] is None:
            row.update(status="missing", error="no prediction")
            log.warning("%s: no prediction in %s, scored 0", case_id,
                        pred_dir)
        else:
            try:
                row.update(evaluate_case(row["prediction"], truth_path,
                                         spec))
            except (io.CaseError, ValueError, OSError) as err:
                row.update(status="error", error=str(err))
                log.error("%s: %s", case_id, err)
        rows.append(row)
    mean = {key: float(np.mean([r[key] for r in rows]))
            for key in spec.keys}
    report = {
        "cases": rows,
        "mean": mean,
        "num_cases": len(rows),
        "missing": [r["case_id"] for r in rows if r["status"] == "missing"],
        "errors": [r["case_id"] for r in rows if r["status"] == "error"],
        "extra": sorted(set(preds) - set(truths)),
        "conventions": spec.conventions,
    }
    # KiTS19 reports predate the key; theirs stay byte-identical.
    if metric != "kits19":
        report["metric"] = metric
    return report


def metric_of(report):
    """The :class:`Metric` a report was scored with."""
    return get_metric(report.get("metric", "kits19"))


def format_table(report):
    """The per-case scores and the mean as a fixed-width text table."""
    columns = metric_of(report).columns
    widths = [max(7, len(header)) for _, header in columns]

    def line(first, values, last):
        cells = " ".join(f"{v:{w}.4f}" for v, w in zip(values, widths))
        return f"{first:<12} {cells}  {last}"

    header = " ".join(f"{h:>{w}}" for (_, h), w in zip(columns, widths))
    lines = [f"{'case':<12} {header}  status"]
    for r in report["cases"]:
        lines.append(line(r["case_id"], [r[k] for k, _ in columns],
                          r["status"]))
    lines.append(line("mean", [report["mean"][k] for k, _ in columns],
                      f"({report['num_cases']} cases)"))
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
    for stale in files.sweep_temporaries(out_dir):
        log.info("Removed %s (left by an interrupted run)", stale)
    earlier = existing_report_files(out_dir)
    paths = {"json": os.path.join(out_dir, "scores.json"),
             "csv": os.path.join(out_dir, "scores.csv")}

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, metric_of(report).fields,
                                    extrasaction="ignore")
            writer.writeheader()
            writer.writerows(report["cases"])

    files.write_json(paths["json"], report)
    files.atomic_write(paths["csv"], write_csv)
    metric = metric_of(report)
    paths["boxplot"] = figures.save_boxplot(
        report, os.path.join(out_dir, "dice_boxplot.png"), metric)
    for rank, row in pick_examples(report).items():
        path = os.path.join(out_dir, f"overlay_{rank}_{row['case_id']}.png")
        paths[f"overlay_{rank}"] = figures.save_overlay(row, path, metric,
                                                        rank)
    for path in set(earlier) - set(paths.values()):
        os.remove(path)
    return paths


def pick_examples(report):
    """Best, median and worst scored case by the metric's rank key
    (KiTS19: composite Dice)."""
    key = metric_of(report).rank_key
    scored = sorted((r for r in report["cases"] if r["status"] == "ok"),
                    key=lambda r: r[key])
    if not scored:
        return {}
    return {"best": scored[-1], "median": scored[len(scored) // 2],
            "worst": scored[0]}


def evaluate(pred_dir, truth_dir, out_dir, overwrite=False,
             metric="kits19"):
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
    report = evaluate_folders(pred_dir, truth_dir, metric)
    paths = write_report(report, out_dir)
    return report, paths
