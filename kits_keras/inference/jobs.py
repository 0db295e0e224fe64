"""The jobs of ``kits-keras infer``: which cases, and where their outputs go.

:func:`find_inputs` turns paths (NIfTI files, KiTS19 case folders, folders
of DICOM series) into cases, :func:`plan_jobs` gives each a :class:`Job`
with its output path and refuses, before anything is written, two cases
writing one file or an output replacing an input; :func:`output_paths`
lists every file a job writes and :func:`read_input` reads its CT.
:mod:`kits_keras.inference.batch` runs the jobs.
"""

import dataclasses
import os
import typing

import numpy as np

from kits_keras import files
from kits_keras import io

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
               if not files.is_hidden(name)
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
        if files.is_hidden(name):
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
    """Every file :func:`kits_keras.inference.batch.infer_case` writes for
    ``job``, sidecars included."""
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
