"""Running the batch jobs of ``kits-keras infer``: segment, write, report.

:func:`run_inference` takes input paths, plans one
:class:`kits_keras.inference.jobs.Job` per case
(:mod:`kits_keras.inference.jobs`: inputs, output paths, collision checks),
loads the model once (:func:`load_model`, the one way to load a model for
inference) and runs :func:`infer_case` on each: it segments the case with
:func:`kits_keras.inference.predict.segment_volume` and writes the
segmentation, its JSON report and the optional outputs. A failing case is
one line naming its file; the others go on.
"""

import logging
import os
import time

import numpy as np

from kits_keras import backend
from kits_keras import files
from kits_keras import io
from kits_keras.config import override
from kits_keras.inference import predict
from kits_keras.inference.jobs import InferOptions
from kits_keras.inference.jobs import existing_output
from kits_keras.inference.jobs import find_inputs
from kits_keras.inference.jobs import index_path
from kits_keras.inference.jobs import output_paths
from kits_keras.inference.jobs import plan_jobs
from kits_keras.inference.jobs import read_input
from kits_keras.inference.jobs import sidecar
from kits_keras.inference.jobs import summary_path

log = logging.getLogger(__name__)


def infer_case(job, network, config, stats, options=InferOptions(),
               progress=None, orientation=io.KITS19_ORIENTATION, model=""):
    """Segments one file and writes its outputs; returns the JSON report.

    The CT is reoriented to ``orientation`` (the model's training
    orientation, ``Artifact.orientation``) and the segmentation written
    back on the file's own grid (for a DICOM series: the grid of its
    dcm2niix conversion, and/or a DICOM SEG referencing it). ``model``
    (the model's path, or a list of an ensemble's) is named in the JSON
    and HTML reports.
    """
    models = [model] if isinstance(model, str) else list(model)
    model = " + ".join(models)
    models = [m for m in models if m]
    start = time.perf_counter()
    volume = read_input(job, orientation)
    t_read = time.perf_counter() - start
    tiles = None if progress is None else (
        lambda done, total: progress(job.case_id, done, total))
    labels, pred, removed, t_post = predict.segment_volume(
        volume, network, config, stats, options.postprocess, tiles)
    written = _write_segmentation(job, labels, volume, options)
    volumes = io.label_volumes_ml(labels, volume.spacing,
                                  config.model.num_classes)
    written.update(_write_extras(job, labels, volumes, pred, volume, options,
                                 model, config))
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
        # The model file(s) that made it: several for an ensemble.
        "models": models,
        "timings_s": {**pred.timings, "read": t_read, "postprocess": t_post},
        # What ran the network, and why (backend, oneDNN, CPU kind).
        "runtime": backend.describe(),
    }
    if job.series is not None:
        report["dicom_series_uid"] = job.series.uid
    report["timings_s"]["total"] = time.perf_counter() - start
    path = sidecar(job.output_path, ".json")
    files.write_json(path, report)
    written["report"] = path
    return report


def _write_segmentation(job, labels, volume, options):
    """Writes the NIfTI and/or DICOM SEG of ``labels`` (uint8 ``(z, y, x)``
    on ``volume``'s grid); returns ``{"segmentation": path, ...}``."""
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
        files.atomic_write(seg_path, lambda tmp: seg.save_as(tmp))
        written["dicom_seg"] = seg_path
        written.setdefault("segmentation", seg_path)
    return written


def _write_extras(job, labels, volumes, pred, volume, options, model,
                  config):
    """Writes the optional outputs of ``options`` (probabilities, PNG
    preview, HTML report); returns ``{kind: path}``."""
    written = {}
    if options.save_probabilities:
        written["probabilities"] = _save_probabilities(job, pred, volume,
                                                       config)
    if options.preview:
        from kits_keras import viz

        written["preview"] = viz.save_orthogonal_views(
            sidecar(job.output_path, ".png"), volume.array, volume.spacing,
            overlays=[(labels, viz.label_colours(labels), "prediction")],
            title=f"{job.case_id} prediction",
        )
    if options.report:
        from kits_keras.report import write_case_report
        from kits_keras.segmenter import Result

        written["report_html"] = write_case_report(
            sidecar(job.output_path, ".html"),
            Result(labels, volumes, pred.qc, volume, job.series, model),
            case_id=job.case_id, input_path=job.image_path)
    return written


def _save_probabilities(job, pred, volume, config):
    from kits_keras.model.regions import channel_names

    path = sidecar(job.output_path, "_probabilities.npz")
    # Classes (softmax) or regions (sigmoids): the names say which.
    channels = np.asarray(channel_names(config.model, config.data.label_set))

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f, probabilities=pred.probabilities.astype(np.float16),
                spacing=np.asarray(pred.network_spacing),
                original_shape=np.asarray(volume.array.shape),
                original_spacing=np.asarray(volume.spacing),
                channels=channels)

    return files.atomic_write(path, write)


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
        model: str, list of str, or None. A run folder or ``.keras`` file
            (:func:`kits_keras.artifact.load_artifact`), a ``kits-keras
            export`` folder (as ``saved_model``), or None for the latest
            finished run. Several (a list of two or more): an
            :class:`kits_keras.inference.ensemble.Ensemble` of them, their
            probabilities averaged.
        saved_model: str or None. A ``kits-keras export`` folder (model
            base path or version folder), run through
            :func:`kits_keras.inference.saved_model.load_saved_model`
            (TensorFlow, CPU) instead of ``model``.

    Returns:
        :class:`kits_keras.artifact.Artifact`,
        :class:`kits_keras.inference.saved_model.SavedModelArtifact` or
        :class:`kits_keras.inference.ensemble.Ensemble`: all give
        ``network``, ``config``, ``stats``, ``path`` and ``metadata``.

    Raises:
        FileNotFoundError: with instructions when there is no model at all.
    """
    from kits_keras import artifact
    from kits_keras.inference import saved_model as exported

    if isinstance(model, (list, tuple)):
        if saved_model is not None:
            raise ValueError("an ensemble takes its exports as models, "
                             "not as saved_model")
        if len(model) > 1:
            from kits_keras.inference.ensemble import Ensemble

            return Ensemble([load_model(m) for m in model])
        model = model[0] if model else None
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
        model: str, list of str, or None. Run folder or ``.keras`` file;
            several: their ensemble (:func:`load_model`); None = latest
            run.
        saved_model: str or None. A ``kits-keras export`` folder (model base
            path or version folder) to run instead of ``model``, through
            :func:`kits_keras.inference.saved_model.load_saved_model` (TensorFlow,
            CPU).
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
    todo, failures = _triage(jobs, found, options)
    reports = []
    _sweep_temporaries(todo)
    if todo:
        art = load_model(model, saved_model)
        reports = _infer_all(todo, art, infer_overrides, options, progress,
                             failures)
    summary = {"cases": reports, "failures": failures}
    if reports:
        summary["runtime"] = reports[0]["runtime"]
    if summary_file is not None and reports:
        files.write_json(summary_file, summary)
    if index_file is not None and reports:
        from kits_keras.report import write_index

        write_index(index_file, summary)
    return summary


def _failure(job, error):
    return {"case_id": job.case_id, "input": job.image_path, "error": error}


def _triage(jobs, found, options):
    """``(todo, failures)``: the jobs to run, and a failure for each
    unusable input or existing output."""
    failures, todo = [], []
    for job, item in zip(jobs, found):
        error = item.error
        if error is None:
            error = existing_output(job, options)
        if error:
            log.error("%s", error)
            failures.append(_failure(job, error))
        else:
            todo.append(job)
    return todo, failures


def _sweep_temporaries(jobs):
    """Removes what an interrupted run left in the jobs' output folders."""
    for folder in sorted({os.path.dirname(os.path.abspath(p))
                          for job in jobs for p in output_paths(job)}):
        for path in files.sweep_temporaries(folder):
            log.info("Removed %s (left by an interrupted run)", path)


def _infer_all(jobs, art, infer_overrides, options, progress, failures):
    """Runs :func:`infer_case` on every job with the model ``art``; returns
    the reports and appends a failure per failed case to ``failures``."""
    from kits_keras.artifact import orientation_of

    changes = {k: v for k, v in (infer_overrides or {}).items()
               if v is not None}
    config = override(art.config, infer=changes) if changes else art.config
    orientation = orientation_of(art.metadata, art.path)
    reports = []
    for job in jobs:
        try:
            reports.append(infer_case(job, art.network, config, art.stats,
                                      options, progress, orientation,
                                      getattr(art, "paths", str(art.path))))
        except (io.CaseError, ValueError, OSError, MemoryError) as err:
            # One case's failure, even out of memory, is one line naming
            # its file; the batch goes on.
            error = _case_error(job, err)
            log.error("%s: %s", job.case_id, error)
            failures.append(_failure(job, error))
    return reports
