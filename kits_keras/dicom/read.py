"""Reading DICOM CT series into :class:`kits_keras.io.Volume` s.

A folder (searched recursively) may hold one series or several: each
SeriesInstanceUID is one case. Files are recognised by the ``DICM`` magic of
DICOM Part 10 (other files, and dot-files, are skipped), and objects that
are not images (DICOM SEG, RT structures, SR, presentation states) are
skipped, so our own DICOM SEG outputs beside a series do not disturb it.

Geometry, as dcm2niix and nibabel derive it (DICOM PS3.3 C.7.6.2.1.1;
:mod:`kits_keras.dicom.geometry`):

* slices are sorted by their position along the slice normal (the cross
  product of the two ImageOrientationPatient directions), never by file
  name or InstanceNumber;
* the slice spacing is taken from those positions, never from
  SliceThickness or SpacingBetweenSlices;
* intensities are ``stored * RescaleSlope + RescaleIntercept`` (HU), slice
  by slice;
* the volume's file layout is dcm2niix's: voxel axis 0 along a row
  (columns), axis 1 along a column with the rows reversed, axis 2 the
  slices in increasing position along the normal; the affine is the LPS
  one of the standard converted to RAS (x and y negated). A NIfTI written
  on this grid (:func:`kits_keras.io.save_like`) lies on the grid of
  dcm2niix's conversion of the series. The array itself is reoriented like
  every other volume (:func:`kits_keras.orientation.orientation_to`).

Compressed transfer syntaxes (JPEG 2000, JPEG-LS, JPEG lossless/baseline,
RLE) are decoded by pydicom's plug-ins (pylibjpeg-openjpeg, pyjpegls,
pylibjpeg-libjpeg, pylibjpeg-rle: the ``kits-keras[dicom]`` extra).

Refused, with one line naming a file (:class:`kits_keras.io.CaseError`),
before any pixel is decoded: a modality other than CT; localizer/scout
images; multi-frame or colour images; slices of one series whose size,
pixel spacing, orientation or frame of reference differ (a mixed series);
two slices at one position (two acquisitions in one series); a gantry tilt
(positions off the slice normal by more than
:data:`kits_keras.dicom.geometry.TOLERANCE` of the spacing); missing slices
(a gap of 1.5 spacings or more); irregular spacing (a position off the
regular grid by more than that share of the spacing); a series of one
slice; and the size and geometry limits of :mod:`kits_keras.io`.
"""

import dataclasses
import logging
import os
import re

import numpy as np

from kits_keras import files

from kits_keras import nifti_checks

from kits_keras import io
from kits_keras.dicom.geometry import header_floats
from kits_keras.dicom.geometry import place_slices

log = logging.getLogger(__name__)

EXTRA = "kits-keras[dicom]"
# Objects that are not images (skipped when found in a folder).
NON_IMAGE_MODALITIES = ("SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD",
                        "SR", "PR", "KO", "REG", "DOC", "PLAN", "FID")
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"


def require_pydicom():
    """Imports pydicom, or says which extra to install."""
    try:
        import pydicom
    except ImportError:
        raise io.CaseError(
            "reading DICOM needs pydicom and its JPEG decoders: pip install "
            f"'{EXTRA}'") from None
    return pydicom


def is_dicom_file(path):
    """Whether ``path`` is a DICOM Part 10 file (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


@dataclasses.dataclass(frozen=True)
class Series:
    """One DICOM series found in a folder.

    Attributes:
        uid: str. SeriesInstanceUID.
        folder: str. The folder it was found in (the input).
        files: tuple of str. Its image files, in file-name order.
        description: str. SeriesDescription ("" if none).
        number: str. SeriesNumber ("" if none).
    """

    uid: str
    folder: str
    files: tuple
    description: str = ""
    number: str = ""


def _walk(folder):
    """Every non-hidden file under ``folder``, sorted, recursively."""
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not files.is_hidden(d))
        for name in sorted(names):
            if not files.is_hidden(name):
                yield os.path.join(root, name)


def _stand_in_uid(ds):
    """Groups slices of anonymised files that lost their SeriesInstanceUID
    by what else names a series."""
    keys = ("StudyInstanceUID", "SeriesNumber", "FrameOfReferenceUID",
            "SeriesDescription", "Modality")
    return "no-uid:" + "|".join(str(ds.get(k, "")) for k in keys)


def find_series(folder):
    """The DICOM series under ``folder``, and the files that failed.

    Returns:
        ``(series, errors)``: a list of :class:`Series` (in order of their
        first file) and a list of one-line messages, each naming a DICOM
        file whose header cannot be read.
    """
    paths = [p for p in _walk(folder) if not io.is_nifti(p)
             and is_dicom_file(p)]
    if not paths:
        return [], []
    pydicom = require_pydicom()
    groups, info, errors = {}, {}, []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as err:  # pydicom raises many kinds
            errors.append(f"{path}: cannot read DICOM header "
                          f"({files.first_line(err)})")
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        modality = str(ds.get("Modality", "")).upper()
        if sop_class == _MEDIA_DIRECTORY or modality in NON_IMAGE_MODALITIES:
            log.debug("Skipping %s (%s, not an image)", path,
                      modality or "DICOMDIR")
            continue
        uid = str(ds.get("SeriesInstanceUID", "")) or _stand_in_uid(ds)
        groups.setdefault(uid, []).append(path)
        info.setdefault(uid, (str(ds.get("SeriesDescription", "")),
                              str(ds.get("SeriesNumber", ""))))
    series = [Series(uid, os.fspath(folder), tuple(members), *info[uid])
              for uid, members in groups.items()]
    return series, errors


def series_folder(series):
    """The deepest folder holding every file of ``series``."""
    return os.path.commonpath([os.path.dirname(os.path.abspath(f))
                               for f in series.files])


def case_ids(folder, series):
    """A readable, unique case id per series of ``folder``.

    One series: the folder's name. Several, each in its own folder: those
    folders' names. Otherwise ``<folder>_s<SeriesNumber>_<description>``,
    or the SeriesInstanceUID where those repeat.

    >>> case_ids("/data/ct", [Series("1.2", "/data/ct", ())])
    ['ct']
    >>> case_ids("/d/p1", [Series("1.2", "", (), "CT Body 3.0", "2"),
    ...                    Series("1.3", "", (), "Scout", "1")])
    ['p1_s2_CT_Body_3.0', 'p1_s1_Scout']
    """
    base = os.path.basename(os.path.abspath(folder))
    if len(series) == 1:
        return [base]
    own = [os.path.basename(series_folder(s)) if s.files else ""
           for s in series]
    if all(own) and len(set(own)) == len(own) and base not in own:
        return own
    names = []
    for s in series:
        parts = [base] + ([f"s{s.number}"] if s.number else []) + (
            [s.description] if s.description else [])
        names.append(re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts)))
    return [n if names.count(n) == 1 and n != base else f"{base}_{s.uid}"
            for n, s in zip(names, series)]


@dataclasses.dataclass(frozen=True)
class _Slice:
    path: str
    position: np.ndarray
    dataset: object


def _check_slice(path, ds):
    """Refusals that one file's header decides."""
    modality = str(ds.get("Modality", "")).upper()
    if modality != "CT":
        raise io.CaseError(f"{path}: modality {modality or 'missing'}, not "
                           "CT; only CT series are segmented")
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        raise io.CaseError(f"{path}: a localizer (scout) image, not a slice "
                           "of a CT volume; leave it out of the folder")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise io.CaseError(f"{path}: a multi-frame (enhanced) CT image; "
                           "only single-frame series are read")
    if int(ds.get("SamplesPerPixel", 1)) != 1 or str(ds.get(
            "PhotometricInterpretation", "MONOCHROME2")) != "MONOCHROME2":
        raise io.CaseError(f"{path}: not a MONOCHROME2 greyscale image "
                           "(photometric "
                           f"{ds.get('PhotometricInterpretation')})")
    for key in ("Rows", "Columns"):
        if not 1 <= int(ds.get(key, 0) or 0) <= nifti_checks.MAX_AXIS_VOXELS:
            raise io.CaseError(f"{path}: {key} {ds.get(key)} outside 1 to "
                               f"{nifti_checks.MAX_AXIS_VOXELS}")


def _same(first, other, path):
    """Refuses a slice unlike the first one (a mixed series)."""
    for key in ("Rows", "Columns", "FrameOfReferenceUID"):
        if str(first.dataset.get(key)) != str(other.dataset.get(key)):
            raise io.CaseError(
                f"{path}: {key} {other.dataset.get(key)} differs from "
                f"{first.path} ({first.dataset.get(key)}): a mixed series")
    for key, count in (("PixelSpacing", 2), ("ImageOrientationPatient", 6)):
        a = header_floats(first.dataset, key, count, first.path)
        b = header_floats(other.dataset, key, count, path)
        if not np.allclose(a, b, rtol=0, atol=1e-4):
            raise io.CaseError(
                f"{path}: {key} {b.tolist()} differs from {first.path} "
                f"({a.tolist()}): a mixed series")


def _header(affine):
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    return header


def read_headers(series):
    """Checked, sorted slices and the dcm2niix affine of ``series``."""
    pydicom = require_pydicom()
    slices = []
    for path in series.files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as err:
            raise io.CaseError(f"{path}: cannot read DICOM header "
                               f"({files.first_line(err)})") from None
        _check_slice(path, ds)
        position = header_floats(ds, "ImagePositionPatient", 3, path)
        slices.append(_Slice(path, position, ds))
    if not slices:
        raise io.CaseError(f"{series.folder}: no image in series "
                           f"{series.uid}")
    for other in slices[1:]:
        _same(slices[0], other, other.path)
    return place_slices(slices)


def _pixels(path, pydicom):
    """One slice in HU (float32, rows x columns)."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:
        raise io.CaseError(f"{path}: cannot read DICOM "
                           f"({files.first_line(err)})") from None
    try:
        stored = ds.pixel_array
    except Exception as err:
        text = files.first_line(err)
        syntax = ds.file_meta.get("TransferSyntaxUID")
        name = f" {syntax.name}" if syntax is not None else ""
        hint = (f"; install the decoders: pip install '{EXTRA}'"
                if re.search(r"missing|plugin|dependenc|handler", text, re.I)
                else "")
        raise io.CaseError(f"{path}: cannot decode the{name} pixel data "
                           f"({text}){hint}") from None
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return stored.astype(np.float32) * np.float32(slope) + np.float32(
        intercept)


def read_series(series, orientation=io.KITS19_ORIENTATION):
    """Reads one series into a float32 HU :class:`kits_keras.io.Volume`.

    Every header is checked (module docstring) before a pixel is decoded.
    ``Volume.path`` is the series' folder; ``Volume.affine`` and
    ``Volume.orientation`` describe dcm2niix's layout, so
    :func:`kits_keras.io.save_like` writes NIfTI on the DICOM grid.

    Raises:
        CaseError: one line naming the file at fault.
    """
    pydicom = require_pydicom()
    slices, affine = read_headers(series)
    first = slices[0].dataset
    shape = (int(first.Columns), int(first.Rows), len(slices))
    if int(np.prod(shape, dtype=np.int64)) > nifti_checks.MAX_VOXELS:
        raise io.CaseError(f"{series.folder}: {shape} voxels, over the "
                           f"limit of {nifti_checks.MAX_VOXELS:,}")
    spacing = nifti_checks.check_geometry(series.folder, affine, shape)
    stack = np.empty((len(slices), shape[1], shape[0]), np.float32)
    for k, piece in enumerate(slices):
        hu = _pixels(piece.path, pydicom)
        if hu.shape != stack.shape[1:]:
            raise io.CaseError(f"{piece.path}: pixel data {hu.shape}, "
                               f"header says {stack.shape[1:]}")
        if not np.all(np.isfinite(hu)):
            raise io.CaseError(f"{piece.path}: non-finite intensities")
        stack[k] = hu
    # File layout (columns, rows reversed, slices): a view of the stack.
    data = stack.transpose(2, 1, 0)[:, ::-1, :]
    return io.oriented_volume(data, spacing, affine, _header(affine),
                              orientation, series.folder)


def read_folder(folder, orientation=io.KITS19_ORIENTATION):
    """Reads a folder holding exactly one DICOM series.

    Example (a series that ``kits-keras synth --format dicom`` wrote):

    >>> import tempfile
    >>> from kits_keras.dicom import write as dicom_write
    >>> folder = tempfile.mkdtemp()
    >>> _ = dicom_write.write_synthetic_series(folder, seed=0)
    >>> volume = read_folder(folder)
    >>> volume.array.ndim, float(volume.array.min()) < -900
    (3, True)
    """
    found, errors = find_series(folder)
    if errors:
        raise io.CaseError(errors[0])
    if len(found) != 1:
        raise io.CaseError(f"{folder}: {len(found)} DICOM series; expected "
                           "one (kits-keras infer takes each as a case)")
    return read_series(found[0], orientation)
