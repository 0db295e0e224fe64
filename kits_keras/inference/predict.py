"""Predicting one CT volume: preprocessing, sliding window, back to its grid.

:func:`predict_case` is pure NumPy/SciPy around a network callable
(``Artifact.network``): it preprocesses with the very function the TFDS
builder uses (:func:`kits_keras.data.preprocessing.preprocess_image`), predicts
by overlapping sliding window with mirroring
(:mod:`kits_keras.inference.sliding_window`), brings the probabilities back to
the input's grid and takes the argmax.

Bounded memory: probabilities are held whole only at the network's
(resampled) resolution. Going back to the original grid is
:func:`kits_keras.data.preprocessing.resample_probabilities` with
``labels=True``: the preprocessing resampler, reducing each slab of slices
to labels at once, so the 1059 x 512 x 512 x 3 float volume (3.3 GB) never
exists.

Quality control: the mirroring-disagreement score is the share of predicted
foreground voxels (at network resolution) where the mirrored predictions of
the covering tiles disagree on the label, Gaussian-weighted over tiles (a
voxel counts when more than half of its tile weight disagrees). It is
estimated on every 2nd voxel along each axis (an unbiased sample at 1/8 of
the cost) and is None with ``tta="none"``. Cases above
``config.infer.qc_threshold`` are flagged for review.
"""

import dataclasses
import logging
import os
import time
import typing

import numpy as np

from kits_keras import io
from kits_keras.inference import sliding_window as sw
from kits_keras.config import override

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Result of :func:`predict_case`.

    Attributes:
        labels: uint8 ``(z, y, x)`` on the input's grid, in {0, 1, 2}.
        probabilities: float32 ``(z, y, x, C)`` at network resolution.
        network_spacing: spacing (mm, ``(z, y, x)``) of ``probabilities``.
        qc: dict. ``mirroring_disagreement`` (share, or None without
            mirroring), ``flagged`` (bool), ``threshold``, ``tta``,
            ``removed_outside_body_ml`` (kidney and tumour mL the network
            put outside the body, set to background).
        timings: dict of seconds: ``preprocess``, ``sliding_window``,
            ``network``, ``resample``, ``total``.
    """

    labels: np.ndarray
    probabilities: np.ndarray
    network_spacing: tuple
    qc: dict
    timings: dict


def mirroring_disagreement(probabilities, disagreement):
    """Share of predicted foreground voxels whose label changes with mirroring.

    Args:
        probabilities: float32 ``(z, y, x, C)``.
        disagreement: float32 map of
            :func:`kits_keras.inference.sliding_window.sliding_window` (every
            2nd voxel of ``probabilities``), or None.

    Returns:
        float in [0, 1], or None when there was no mirroring.
    """
    from kits_keras.data.preprocessing import argmax_labels

    if disagreement is None:
        return None
    # The disagreement map samples every 2nd voxel (sliding_window).
    sample = probabilities[::2, ::2, ::2]
    foreground = argmax_labels(np.moveaxis(sample, -1, 0)) > 0
    count = int(np.count_nonzero(foreground))
    if count == 0:
        return 0.0
    return float(np.count_nonzero(foreground & (disagreement > 0.5)) / count)


def predict_case(volume, network, config, stats, progress=None):
    """Segments one CT volume on its own grid.

    Args:
        volume: :class:`kits_keras.io.Volume`. CT in HU, ``(z, y, x)``.
        network: callable ``(B, z, y, x, 1) float32 -> (B, z, y, x, C)``
            probabilities (``Artifact.network``).
        config: :class:`kits_keras.config.ExperimentConfig`. Uses
            ``data.patch_size``, ``data.target_spacing`` and ``infer``.
        stats: :class:`kits_keras.data.intensity.IntensityStats` of
            training.
        progress: optional callable ``(tiles_done, tiles_total)``.

    Returns:
        :class:`Prediction` (labels before post-processing).
    """
    from kits_keras.inference.body_mask import remove_outside_body
    from kits_keras.data.preprocessing import preprocess_image
    from kits_keras.data.preprocessing import resample_probabilities

    infer = config.infer
    start = time.perf_counter()
    target = tuple(config.data.target_spacing)
    image = preprocess_image(volume.array, volume.spacing, stats, target)
    t_pre = time.perf_counter()
    window = sw.sliding_window(
        image, network, config.data.patch_size, overlap=infer.overlap,
        tta=infer.tta, batch_size=infer.batch_size,
        sigma_scale=infer.gaussian_sigma_scale, progress=progress,
    )
    del image
    t_win = time.perf_counter()
    labels = resample_probabilities(window.probabilities, volume.array.shape,
                                    labels=True)
    t_res = time.perf_counter()
    removed = remove_outside_body(labels, volume.array, volume.spacing,
                                  window.probabilities.shape[-1])
    score = mirroring_disagreement(window.probabilities, window.disagreement)
    ml = volume.voxel_volume_ml
    qc = {
        "mirroring_disagreement": score,
        "threshold": infer.qc_threshold,
        "flagged": bool(score is not None and score > infer.qc_threshold),
        "tta": infer.tta,
        "tiles": window.tiles,
        # Foreground the network put outside the body (air, table), set to
        # background: mL per class.
        "removed_outside_body_ml": {
            name: round(removed.get(index, 0) * ml, 3)
            for index, name in enumerate(io.CLASS_NAMES) if index > 0},
    }
    timings = {
        "preprocess": t_pre - start,
        "sliding_window": window.total_seconds,
        "network": window.network_seconds,
        "resample": t_res - t_win,
        "total": time.perf_counter() - start,
    }
    return Prediction(labels, window.probabilities, target, qc, timings)


# --- Batch inference: files in, segmentations + JSON reports out. ---------

SEG_SUFFIX = "_seg"


@dataclasses.dataclass(frozen=True)
class InferOptions:
    """What to write besides the segmentation, and how.

    Attributes:
        postprocess: bool. Apply
            :func:`kits_keras.inference.postprocess.postprocess`.
        save_probabilities: bool. Also write ``<seg>_probabilities.npz``:
            float16 ``(z, y, x, C)`` at network resolution with its spacing.
        preview: bool. Also write ``<seg>.png`` (axial, coronal, sagittal
            through the largest tumour, prediction outlined on the CT).
        report: bool. Also write ``<seg>.html``, a self-contained review
            page (:mod:`kits_keras.report`), and for a folder ``output``
            its ``index.html`` listing every case and failure.
        overwrite: bool. Replace existing outputs.
        output_type: str. "nifti" (``<seg>.nii.gz``), "dicom-seg"
            (``<seg>.dcm``, a DICOM SEG referencing the source series; DICOM
            inputs only) or "both".
    """

    postprocess: bool = True
    save_probabilities: bool = False
    preview: bool = False
    report: bool = False
    overwrite: bool = False
    output_type: str = "nifti"

    def __post_init__(self):
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}. "
                             f"Received: output_type={self.output_type!r}")


OUTPUT_TYPES = ("nifti", "dicom-seg", "both")


@dataclasses.dataclass(frozen=True)
class Job:
    """One case to segment: its id, CT file and segmentation path.

    For a DICOM series, ``image_path`` is the series' folder and ``series``
    the :class:`kits_keras.dicom.read.Series`.
    """

    case_id: str
    image_path: str
    output_path: str
    series: object = None


class Found(typing.NamedTuple):
    """One input of :func:`find_inputs`."""

    case_id: str
    path: object  # str, or None when unusable
    error: object  # one-line message, or None
    series: object = None  # kits_keras.dicom.read.Series for a DICOM series


def find_inputs(inputs):
    """One :class:`Found` per case: ``(case_id, path or None, error or
    None, series or None)``.

    An input is a NIfTI file, a KiTS19 case folder (``imaging.nii.gz``
    inside), a folder of either, or a folder holding DICOM series (searched
    recursively; used when it holds no NIfTI input): each series is a case
    (:func:`kits_keras.dicom.read.find_series`), its ``path`` the series'
    folder. In a folder, our own ``*_seg.nii.gz`` outputs,
    ``segmentation.nii.gz`` files and hidden files (names starting with a
    dot: temporaries of an interrupted write, editor and OS files) are
    skipped. Unusable inputs come with ``None`` as path and an error
    message.
    """
    found = []
    for path in inputs:
        path = os.fspath(path).rstrip("/") or "/"
        if os.path.isfile(path):
            if io.is_nifti(path):
                found.append(Found(io.nifti_stem(path), path, None))
            else:
                from kits_keras.dicom.read import is_dicom_file

                hint = ("a single DICOM file; pass the folder of its series"
                        if is_dicom_file(path) else
                        "not a NIfTI file (.nii/.nii.gz) or DICOM folder")
                found.append(Found(os.path.basename(path), None,
                                   f"{path}: {hint}"))
        elif os.path.isfile(os.path.join(path, io.IMAGE_FILE)):
            found.append(Found(os.path.basename(path),
                               os.path.join(path, io.IMAGE_FILE), None))
        elif os.path.isdir(path):
            inner = _folder_inputs(path)
            if inner and _holds_dicom(path):
                found.append(Found(os.path.basename(path), None, (
                    f"{path}: holds both DICOM files and NIfTI files "
                    f"({', '.join(f.case_id for f in inner[:3])}); pass the "
                    "NIfTI files themselves, or a folder of DICOM only")))
                continue
            inner = inner or _dicom_inputs(path)
            if not inner:
                found.append(Found(os.path.basename(path), None,
                                   f"{path}: no NIfTI files, KiTS19 case "
                                   "folders or DICOM series inside"))
            found.extend(inner)
        else:
            found.append(Found(os.path.basename(path), None,
                               f"{path}: file not found"))
    return found


def _holds_dicom(folder):
    """Whether a file directly in ``folder`` is DICOM (header bytes only)."""
    from kits_keras.dicom.read import is_dicom_file

    return any(is_dicom_file(os.path.join(folder, name))
               for name in sorted(os.listdir(folder))[:64]
               if not io.is_hidden(name)
               and os.path.isfile(os.path.join(folder, name)))


def _dicom_inputs(folder):
    """One :class:`Found` per DICOM series under ``folder``."""
    from kits_keras.dicom import read as dicom

    try:
        series, errors = dicom.find_series(folder)
    except io.CaseError as err:  # the extra is not installed
        return [Found(os.path.basename(folder), None, f"{folder}: {err}")]
    found = [Found(os.path.basename(folder), None, error)
             for error in errors]
    for case_id, one in zip(dicom.case_ids(folder, series), series):
        found.append(Found(case_id, dicom.series_folder(one), None, one))
    return found


def _folder_inputs(folder):
    found = []
    for name in sorted(os.listdir(folder)):
        if io.is_hidden(name):
            continue
        path = os.path.join(folder, name)
        if os.path.isfile(os.path.join(path, io.IMAGE_FILE)):
            found.append(Found(name, os.path.join(path, io.IMAGE_FILE),
                               None))
        elif (os.path.isfile(path) and io.is_nifti(path)
              and not io.nifti_stem(path).endswith(SEG_SUFFIX)
              and name != io.LABELS_FILE):
            found.append(Found(io.nifti_stem(path), path, None))
    return found


SUMMARY_FILE = "summary.json"


def plan_jobs(found, output=None, options=None):
    """One :class:`Job` per :class:`Found` of :func:`find_inputs`: where
    its outputs go (see ``kits-keras infer --help``).

    Raises:
        ValueError: before anything is written, when two inputs would write
            the same file (the same name from two folders, ``y.nii`` beside
            ``y.nii.gz``, a case named ``summary``), or an output would
            replace an input; the message names both.
    """
    single_file = output is not None and io.is_nifti(output)
    if single_file and len(found) != 1:
        raise ValueError(
            f"-o {output} is one file but there are {len(found)} inputs; "
            "give a folder instead."
        )
    jobs = []
    for item in found:
        case_id, image_path, series = item.case_id, item.path, item.series
        if single_file:
            out = output
        elif output is not None:
            out = os.path.join(output, f"{case_id}.nii.gz")
        else:
            # Beside the input: a DICOM series' outputs go beside its
            # folder, never into it.
            out = os.path.join(os.path.dirname(image_path or ""),
                               f"{case_id}{SEG_SUFFIX}.nii.gz")
        jobs.append(Job(case_id, image_path, out, series))
    _check_collisions(jobs, output, options or InferOptions())
    return jobs


def _key(path):
    """One spelling per file: absolute, symlinked folders resolved."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)),
                        os.path.basename(path))


def _check_collisions(jobs, output, options):
    writers = {}
    if summary_path(output) is not None:
        writers[_key(summary_path(output))] = "the batch summary"
    if index_path(output, options) is not None:
        writers[_key(index_path(output, options))] = "the batch index"
    inputs = {_key(j.image_path): j.image_path for j in jobs if j.image_path}
    for job in jobs:
        if job.image_path is None:
            continue
        for path in output_paths(job, options):
            key = _key(path)
            if key in inputs:
                raise ValueError(
                    f"{path}: output of {job.image_path} would replace the "
                    f"input {inputs[key]}; choose another -o")
            if key in writers:
                raise ValueError(
                    f"{path}: {writers[key]} and {job.image_path} would both "
                    "write it; rename one or give -o separate folders")
            writers[key] = job.image_path


def summary_path(output):
    """``summary.json`` of a folder ``-o``, else None."""
    if output is None or io.is_nifti(output):
        return None
    return os.path.join(output, SUMMARY_FILE)


def index_path(output, options):
    """``index.html`` of a folder ``-o`` with ``options.report``, else
    None."""
    from kits_keras.report import INDEX_FILE

    if not options.report or summary_path(output) is None:
        return None
    return os.path.join(output, INDEX_FILE)


def output_paths(job, options=InferOptions()):
    """Every file :func:`infer_case` writes for ``job``, sidecars included."""
    paths = []
    if options.output_type in ("nifti", "both") or job.series is None:
        paths.append(job.output_path)
    if options.output_type in ("dicom-seg", "both") and job.series is not None:
        paths.append(sidecar(job.output_path, ".dcm"))
    paths.append(sidecar(job.output_path, ".json"))
    if options.save_probabilities:
        paths.append(sidecar(job.output_path, "_probabilities.npz"))
    if options.preview:
        paths.append(sidecar(job.output_path, ".png"))
    if options.report:
        paths.append(sidecar(job.output_path, ".html"))
    return paths


def existing_output(job, options=InferOptions()):
    """The error for ``job`` if one of its outputs exists, else None."""
    if options.output_type != "nifti" and job.series is None:
        return (f"{job.image_path}: --output-type {options.output_type} "
                "needs a DICOM series input (a DICOM SEG references the "
                "source images)")
    if options.overwrite:
        return None
    for path in output_paths(job, options):
        if os.path.lexists(path):
            return f"{path}: exists; pass --overwrite to replace it"
    return None


def sidecar(seg_path, suffix):
    """``/o/case.nii.gz`` + ``.json`` -> ``/o/case.json``."""
    folder = os.path.dirname(seg_path)
    return os.path.join(folder, io.nifti_stem(seg_path) + suffix)


def read_input(job, orientation=io.KITS19_ORIENTATION):
    """The CT of ``job`` (NIfTI file or DICOM series), reoriented."""
    if job.series is not None:
        from kits_keras.dicom import read as dicom

        return dicom.read_series(job.series, orientation)
    volume = io.read_image(job.image_path, orientation)
    _refuse_label_map(volume)
    return volume


def _refuse_label_map(volume, sample=1 << 20):
    """A CT in HU has air (-1000) and bone (> 300); even one stored
    without its rescale intercept reaches the thousands. A segmentation
    from another tool (TotalSegmentator's 117 classes, nnU-Net, our own
    outputs) holds small non-negative integers. Segmenting one as a CT
    gives litres of nonsense, so it is refused."""
    flat = volume.array.reshape(-1)
    values = flat[::max(1, flat.size // sample)]
    if values.min() < 0 or np.any(values != np.round(values)):
        return
    distinct = np.unique(values)
    if distinct[-1] <= 255:
        raise io.CaseError(
            f"{volume.path}: looks like a label map (values "
            f"{', '.join(str(int(v)) for v in distinct[:8])}), not a CT in "
            "HU")


def segment_volume(volume, network, config, stats, postprocess=True,
                   progress=None):
    """:func:`predict_case`, then post-processing with
    ``config.postprocess``.

    Returns:
        ``(labels, prediction, voxels_removed, postprocess_seconds)``.
    """
    from kits_keras.inference.postprocess import postprocess as clean

    pred = predict_case(volume, network, config, stats, progress=progress)
    t0 = time.perf_counter()
    labels = (clean(pred.labels, config.postprocess,
                    voxel_ml=volume.voxel_volume_ml)
              if postprocess else pred.labels)
    removed = int(np.count_nonzero(pred.labels != labels))
    return labels, pred, removed, time.perf_counter() - t0


def infer_case(job, network, config, stats, options=InferOptions(),
               progress=None, orientation=io.KITS19_ORIENTATION, model=""):
    """Segments one file and writes its outputs; returns the JSON report.

    The CT is reoriented to ``orientation`` (the model's training
    orientation, ``Artifact.orientation``) and the segmentation written
    back on the file's own grid (for a DICOM series: the grid of its
    dcm2niix conversion, and/or a DICOM SEG referencing it). ``model``
    (the model's path) is named in the HTML report.
    """
    start = time.perf_counter()
    volume = read_input(job, orientation)
    t_read = time.perf_counter() - start
    tiles = None if progress is None else (
        lambda done, total: progress(job.case_id, done, total))
    labels, pred, removed, t_post = segment_volume(
        volume, network, config, stats, options.postprocess, tiles)
    written = {}
    seg_path = sidecar(job.output_path, ".dcm")
    writes_seg = job.series is not None and options.output_type != "nifti"
    if writes_seg:  # built before anything is written: it may fail
        from kits_keras.dicom import write as dicom_write

        seg = dicom_write.make_seg(labels, volume, job.series)
    if job.series is None or options.output_type != "dicom-seg":
        io.save_like(job.output_path, labels, volume)
        written["segmentation"] = job.output_path
    if writes_seg:
        io.atomic_write(seg_path, lambda tmp: seg.save_as(tmp))
        written["dicom_seg"] = seg_path
        written.setdefault("segmentation", seg_path)
    if options.save_probabilities:
        written["probabilities"] = _save_probabilities(job, pred, volume)
    if options.preview:
        from kits_keras import viz

        written["preview"] = viz.save_orthogonal_views(
            sidecar(job.output_path, ".png"), volume.array, volume.spacing,
            overlays=[(labels, viz.LABEL_COLOURS, "prediction")],
            title=f"{job.case_id} prediction",
        )
    volumes = io.label_volumes_ml(labels, volume.spacing)
    if options.report:
        from kits_keras.report import write_case_report
        from kits_keras.segmenter import Result

        written["report_html"] = write_case_report(
            sidecar(job.output_path, ".html"),
            Result(labels, volumes, pred.qc, volume, job.series, model),
            case_id=job.case_id, input_path=job.image_path)
    report = {
        "case_id": job.case_id,
        "input": job.image_path,
        "outputs": written,
        "shape": list(volume.array.shape),
        "spacing_mm": list(volume.spacing),
        "volumes": volumes,
        "postprocess": {"applied": options.postprocess,
                        "voxels_removed": removed},
        "qc": pred.qc,
        "timings_s": {**pred.timings, "read": t_read, "postprocess": t_post},
    }
    if job.series is not None:
        report["dicom_series_uid"] = job.series.uid
    report["timings_s"]["total"] = time.perf_counter() - start
    path = sidecar(job.output_path, ".json")
    io.write_json(path, report)
    written["report"] = path
    return report


def _save_probabilities(job, pred, volume):
    path = sidecar(job.output_path, "_probabilities.npz")

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f, probabilities=pred.probabilities.astype(np.float16),
                spacing=np.asarray(pred.network_spacing),
                original_shape=np.asarray(volume.array.shape),
                original_spacing=np.asarray(volume.spacing))

    return io.atomic_write(path, write)


def _case_error(job, err):
    """``err`` as one line that names the input file."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, MemoryError):
        text = f"out of memory ({text})"
    if not text.startswith(job.image_path):
        text = f"{job.image_path}: {text}"
    return text


def load_model(model=None, saved_model=None):
    """The one way to load a model for inference.

    Args:
        model: str or None. A run folder or ``.keras`` file
            (:func:`kits_keras.artifact.load_artifact`), a ``kits-keras
            export`` folder (as ``saved_model``), or None for the latest
            finished run.
        saved_model: str or None. A ``kits-keras export`` folder (model
            base path or version folder), run through
            :func:`kits_keras.inference.saved_model.load_saved_model`
            (TensorFlow, CPU) instead of ``model``.

    Returns:
        :class:`kits_keras.artifact.Artifact` or
        :class:`kits_keras.inference.saved_model.SavedModelArtifact`: both give
        ``network``, ``config``, ``stats``, ``path`` and ``metadata``.

    Raises:
        FileNotFoundError: with instructions when there is no model at all.
    """
    from kits_keras import artifact
    from kits_keras.inference import saved_model as exported

    if saved_model is None and model is not None and exported.is_export(
            model):
        model, saved_model = None, model
    if saved_model is not None:
        return exported.load_saved_model(saved_model)
    if model is None:
        root = artifact.default_runs_root()
        try:
            model = artifact.latest_run(root, finished=True)
        except FileNotFoundError:
            try:
                hint = (f" {artifact.latest_run(root)} is still training or "
                        "was interrupted; pass it as --model to use its "
                        "best model so far.")
            except FileNotFoundError:
                hint = ""
            raise FileNotFoundError(
                f"No finished trained model found under {root} (set "
                "KITS_KERAS_RUNS or pass --model). Get one with `kits-keras "
                "fit --config coarse --data-dir DIR` (train on KiTS19) or "
                "`kits-keras demo` (a tiny model on synthetic cases in "
                f"minutes).{hint}"
            ) from None
        newest = artifact.latest_run(root)
        skipped = "" if newest == model else (
            f" (not {os.path.basename(newest)}: still training or "
            "interrupted)")
        log.info("Using the latest finished run: %s%s", model, skipped)
    return artifact.load_artifact(model)


def run_inference(inputs, output=None, model=None, infer_overrides=None,
                  options=InferOptions(), progress=None, saved_model=None):
    """Segments every input; a bad input is reported and skipped.

    Args:
        inputs: list of paths (NIfTI files, case folders, folders of them).
        output: str or None. A ``.nii.gz`` file (one input), a folder, or
            None for ``<stem>_seg.nii.gz`` beside each input.
        model: str or None. Run folder or ``.keras`` file; None = latest run.
        saved_model: str or None. A ``kits-keras export`` folder (model base
            path or version folder) to run instead of ``model``, through
            :func:`kits_keras.inference.saved_model.load_saved_model`
            (TensorFlow, CPU).
        infer_overrides: dict of :class:`InferenceConfig` fields to change
            (``overlap``, ``tta``, ``batch_size``), None values ignored.
        options: :class:`InferOptions`.
        progress: optional callable ``(case_id, tiles_done, tiles_total)``.

    Returns:
        dict with ``cases`` (per-case reports) and ``failures``
        (``{"case_id", "input", "error"}``), also written as
        ``summary.json`` (and with ``options.report``, ``index.html``)
        when ``output`` is a folder.
    """
    found = find_inputs(inputs)
    jobs = plan_jobs(found, output, options)
    summary_file = summary_path(output)
    index_file = index_path(output, options)
    for path in (summary_file, index_file):
        if path and os.path.lexists(path) and not options.overwrite:
            raise ValueError(f"{path}: exists; pass --overwrite to "
                             "replace it")
    failures, todo = [], []
    for job, item in zip(jobs, found):
        error = item.error
        if error is None:
            error = existing_output(job, options)
        if error:
            log.error("%s", error)
            failures.append({"case_id": job.case_id, "input": job.image_path,
                             "error": error})
        else:
            todo.append(job)
    reports = []
    for folder in sorted({os.path.dirname(os.path.abspath(p))
                          for job in todo for p in output_paths(job)}):
        for path in io.sweep_temporaries(folder):
            log.info("Removed %s (left by an interrupted run)", path)
    if todo:
        art = load_model(model, saved_model)
        changes = {k: v for k, v in (infer_overrides or {}).items()
                   if v is not None}
        config = override(art.config, infer=changes) if changes else art.config
        from kits_keras.artifact import orientation_of

        orientation = orientation_of(art.metadata, art.path)
        for job in todo:
            try:
                reports.append(infer_case(job, art.network, config, art.stats,
                                          options, progress, orientation,
                                          str(art.path)))
            except (io.CaseError, ValueError, OSError, MemoryError) as err:
                # One case's failure, even out of memory, is one line
                # naming its file; the batch goes on.
                error = _case_error(job, err)
                log.error("%s: %s", job.case_id, error)
                failures.append({"case_id": job.case_id,
                                 "input": job.image_path, "error": error})
    summary = {"cases": reports, "failures": failures}
    if summary_file is not None and reports:
        io.write_json(summary_file, summary)
    if index_file is not None and reports:
        from kits_keras.report import write_index

        write_index(index_file, summary)
    return summary
