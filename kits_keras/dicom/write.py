"""Writing DICOM: synthetic CT series (tests) and DICOM SEG results.

Synthetic series (``kits-keras synth --format dicom``) carry a synthetic
case (:func:`kits_keras.synthetic.cases.make_case`) as single-frame CT Image
Storage files, stored ``HU + 1024`` with RescaleIntercept -1024, in one of
:data:`VARIANTS`: storage orders and encodings that must all read back as
the same volume, and defects that :mod:`kits_keras.dicom.read` must refuse.

DICOM SEG (:func:`save_seg`): a binary Segmentation (highdicom) that
references every slice of the source series, with segment 1 "Kidney"
(SCT 91723000 Anatomical Structure / SCT 64033007 Kidney) and segment 2
"Renal mass" (SCT 49755003 Morphologically Abnormal Structure / SCT
4147007 Mass, anatomic region SCT 64033007 Kidney), algorithm type
AUTOMATIC.
"""

import contextlib
import copy
import os
import shutil
import tempfile

import numpy as np

from kits_keras.dicom import read as dicom
from kits_keras import files
from kits_keras import io
from kits_keras.orientation import to_file_layout

# Storage variants that read back as the same volume.
SAME_VOLUME = ("head-first", "feet-first", "shuffled-names",
               "shuffled-instances", "rle", "jpeg-ls", "jpeg2000")
# Defects, each refused by kits_keras.dicom.read with one line naming a file.
DEFECTS = ("gantry-tilt", "irregular-spacing", "missing-slice", "mr",
           "localizer", "mixed")
VARIANTS = SAME_VOLUME + DEFECTS
_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_SYNTAXES = {"rle": "1.2.840.10008.1.2.5", "jpeg-ls": "1.2.840.10008.1.2.4.80",
             "jpeg2000": "1.2.840.10008.1.2.4.90"}


def _base_dataset(pydicom, uids, shape, spacing, seed):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PatientName = f"Synthetic^{seed}"
    ds.PatientID = f"SYNTH{seed:05d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    ds.StudyID, ds.AccessionNumber = "1", ""
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber, ds.SeriesDescription = 2, "Synthetic abdomen CT"
    ds.Modality, ds.Manufacturer = "CT", "kits-keras synth"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientPosition = "HFS"
    ds.Rows, ds.Columns = int(shape[1]), int(shape[2])
    ds.PixelSpacing = [f"{spacing[1]:.6g}", f"{spacing[2]:.6g}"]
    ds.SliceThickness = f"{spacing[0]:.6g}"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
    ds.KVP, ds.AcquisitionNumber = 120, 1
    return ds


def _slices(case, variant, seed):
    """``[(file name, dataset)]`` of one synthetic series."""
    import pydicom
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed + 7919)
    hu = np.clip(np.round(case.image.array), -1024, 3071)
    stored = (hu + 1024).astype(np.uint16)  # (z: I, y: P, x: L)
    n, spacing = stored.shape[0], case.image.spacing
    uids = tuple(generate_uid(entropy_srcs=[f"kits-keras {seed} {k}"])
                 for k in ("study", "series", "frame"))
    base = _base_dataset(pydicom, uids, stored.shape, spacing, seed)
    items = [[f"IM_{k + 1:04d}.dcm",
              _slice_dataset(base, stored, k, spacing, variant), k]
             for k in range(n)]
    if variant == "feet-first":  # acquired from the feet up
        items = items[::-1]
    for number, item in enumerate(items, 1):
        item[1].InstanceNumber = number
    items = _break_series(items, variant, n, rng)
    sop_class = _MR_STORAGE if variant == "mr" else _CT_STORAGE
    for name, ds, k in items:
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid()
    return [(name, ds) for name, ds, _ in items]


def _slice_dataset(base, stored, k, spacing, variant):
    """Slice ``k`` of ``stored`` (z, y, x) as a copy of ``base``, placed in
    LPS mm; the "feet-first", "gantry-tilt" and "irregular-spacing"
    variants change its orientation or position."""
    n = stored.shape[0]
    # DICOM LPS: +x patient left, +y posterior, +z head. Array axis 2 runs
    # to L (IOP row direction +x), axis 1 to P (+y), axis 0 down.
    x0 = -0.5 * stored.shape[2] * spacing[2]
    y0 = -0.5 * stored.shape[1] * spacing[1]
    z0 = 0.5 * n * spacing[0]
    ds = copy.deepcopy(base)
    pixels = stored[k]
    position = [x0, y0, z0 - k * spacing[0]]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    if variant == "feet-first":  # viewed from the feet: columns run right
        pixels = pixels[:, ::-1]
        position[0] = x0 + (stored.shape[2] - 1) * spacing[2]
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
        ds.PatientPosition = "FFS"
    if variant == "gantry-tilt":  # 15 degrees: each slice shifted in y
        position[1] += np.tan(np.radians(15)) * k * spacing[0]
        ds.GantryDetectorTilt = 15
    if variant == "irregular-spacing" and k >= n // 2:
        position[2] -= 0.3 * spacing[0]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.SliceLocation = f"{position[2]:.6f}"
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def _break_series(items, variant, n, rng):
    """The ``[name, dataset, k]`` items of a series after the variants that
    rename, renumber, drop, relabel or add files (``n`` slices)."""
    if variant == "shuffled-names":
        for item, name in zip(items, rng.permutation(
                [item[0] for item in items])):
            item[0] = name
    if variant == "shuffled-instances":
        for item, number in zip(items, rng.permutation(len(items)) + 1):
            item[1].InstanceNumber = int(number)
    if variant == "missing-slice":
        del items[n // 2]
    if variant == "mr":
        for item in items:
            item[1].Modality = "MR"
    if variant == "mixed":  # a second acquisition in the same series
        for name, ds, k in list(items):
            again = copy.deepcopy(ds)
            again.AcquisitionNumber = 2
            items.append([f"IM_{k + 1 + n:04d}.dcm", again, k])
    if variant == "localizer":
        scout = copy.deepcopy(items[0][1])
        scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        items.append(["IM_0000.dcm", scout, -1])
    return items


@contextlib.contextmanager
def _quiet_fds():
    """Silences C libraries writing to stdout/stderr directly."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)


def _save(path, ds, variant):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    if variant in _SYNTAXES:
        with _quiet_fds():  # OpenJPEG prints "tile number 1 / 1"
            ds.compress(_SYNTAXES[variant])
    ds.save_as(path, enforce_file_format=True)


def write_synthetic_series(folder, seed=0, variant="head-first",
                           size="small", case_id="case_00000"):
    """Writes one synthetic CT series into ``folder`` (created).

    With a :data:`SAME_VOLUME` variant, also ``segmentation.nii.gz``: the
    case's labels on the series' grid (dcm2niix's layout).

    Args:
        folder: str. Destination folder.
        seed: int. Seed of :func:`kits_keras.synthetic.cases.make_case`.
        variant: one of :data:`VARIANTS`. Defaults to "head-first".
        size: "small" or "full". Defaults to "small".
        case_id: str. Defaults to "case_00000".

    Returns:
        :class:`kits_keras.io.Case` that was written.
    """
    from kits_keras.synthetic import cases as synthetic

    dicom.require_pydicom()
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}. Received: "
                         f"variant={variant!r}")
    case = synthetic.make_case(seed, size, case_id=case_id)
    os.makedirs(folder, exist_ok=True)
    for name, ds in _slices(case, variant, seed):
        _save(os.path.join(folder, name), ds, variant)
    if variant in SAME_VOLUME:
        grid = dicom.read_folder(folder)
        io.save_like(os.path.join(folder, io.LABELS_FILE),
                     case.labels.array, grid)
    return case


def write_dicom_cases(out_dir, num_cases=3, seed=0, size="small",
                      variant="head-first", overwrite=False, on_case=None):
    """Writes ``case_XXXXX/`` DICOM series folders under ``out_dir``.

    Like :func:`kits_keras.synthetic.cases.write_cases`: staged in a hidden
    folder, moved into place only when all are written.

    Returns:
        list of str: the case folders.
    """
    out_dir = os.fspath(out_dir)
    ids = [f"case_{i:05d}" for i in range(num_cases)]
    for case_id in ids:
        target = os.path.join(out_dir, case_id)
        if os.path.exists(target) and not overwrite:
            raise io.CaseError(f"{target}: already exists (--overwrite "
                               "replaces it)")
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".synth-", dir=out_dir)
    try:
        done = []
        for index, case_id in enumerate(ids):
            folder = os.path.join(staging, case_id)
            case = write_synthetic_series(folder, seed + index, variant,
                                          size, case_id)
            final = os.path.join(out_dir, case_id)
            if on_case is not None:
                on_case(final, case)
            done.append((folder, final))
        for folder, final in done:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(folder, final)
        return [final for _, final in done]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- DICOM SEG --------------------------------------------------------------


def _segments(hd):
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="kits-keras", version=_version(),
        family=codes.DCM.ArtificialIntelligence)
    kidney = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Kidney",
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Kidney,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    mass = hd.seg.SegmentDescription(
        segment_number=2, segment_label="Renal mass",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Mass,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[codes.SCT.Kidney])
    return [kidney, mass]


def _version():
    from kits_keras import __version__

    return __version__


def _require_highdicom():
    import logging

    # highdicom logs every module it copies at INFO.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    try:
        import highdicom
    except ImportError:
        raise io.CaseError("writing DICOM SEG needs highdicom: pip install "
                           f"'{dicom.EXTRA}'") from None
    return highdicom


def frames_of(labels, volume):
    """``labels`` (on ``volume.array``'s grid) as ``(slices, rows,
    columns)`` frames in the series' sorted slice order."""
    file_labels = to_file_layout(np.asarray(labels), volume.orientation)
    return np.ascontiguousarray(file_labels[:, ::-1, :].transpose(2, 1, 0))


def make_seg(labels, volume, series):
    """``labels`` as a DICOM SEG dataset referencing ``series``.

    Args:
        labels: uint8 array in {0, 1, 2} on ``volume.array``'s grid.
        volume: :class:`kits_keras.io.Volume` read by
            :func:`kits_keras.dicom.read.read_series` from ``series``.
        series: :class:`kits_keras.dicom.read.Series`.

    Raises:
        CaseError: the source lacks what a SEG must reference (one line
            naming the series folder).
    """
    hd = _require_highdicom()
    slices, _ = dicom.read_headers(series)
    sources = [s.dataset for s in slices]
    frames = frames_of(labels, volume).astype(np.uint8)
    missing = [key for key in ("StudyInstanceUID", "SeriesInstanceUID",
                               "SOPInstanceUID", "FrameOfReferenceUID")
               if not str(sources[0].get(key, ""))]
    if missing:
        raise io.CaseError(f"{slices[0].path}: no {', '.join(missing)}; a "
                           "DICOM SEG cannot reference this series "
                           "(use --output-type nifti)")
    try:
        return hd.seg.Segmentation(
            source_images=sources, pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_segments(hd),
            series_instance_uid=hd.UID(), series_number=9901,
            sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="kits-keras", manufacturer_model_name="kits-keras",
            software_versions=_version(), device_serial_number="0",
            series_description="kits-keras kidney and renal mass")
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise io.CaseError(
            f"{slices[0].path}: cannot write a DICOM SEG for this series "
            f"({files.first_line(err)})") from None


def save_seg(path, labels, volume, series):
    """Writes :func:`make_seg` to ``path`` atomically."""
    seg = make_seg(labels, volume, series)
    return files.atomic_write(path, lambda tmp: seg.save_as(tmp))


def read_seg(path, series):
    """Label frames (``(slices, rows, columns)`` uint8, in the series'
    sorted order) of a DICOM SEG written by :func:`save_seg`."""
    hd = _require_highdicom()
    slices, _ = dicom.read_headers(series)
    seg = hd.seg.segread(path)
    uids = [str(s.dataset.SOPInstanceUID) for s in slices]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1, 2],
        combine_segments=True, skip_overlap_checks=True)
    return np.asarray(pixels, np.uint8)
