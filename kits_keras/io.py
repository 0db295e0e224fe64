"""Reading and writing KiTS19 cases and NIfTI volumes.

Orientation: every volume is read into one voxel orientation, KiTS19's
(:data:`KITS19_ORIENTATION`, nibabel axis codes ``("I", "P", "L")``: axis 0
runs head to feet across slices, axis 1 front to back, axis 2 towards the
patient's left), whatever the file's layout: axes are permuted *and*
flipped (nibabel's ``io_orientation`` / ``ornt_transform``), so a CT stored
RAS or LPS (dcm2niix, SimpleITK, PACS exports) reaches the network as the
KiTS19 volumes it was trained on. :func:`save_like` undoes it, so a
segmentation lies on the input's own grid. Arrays are therefore in
``(z, y, x)`` order. The orientation a model was trained in is stored with
it (:mod:`kits_keras.artifact`).

Spacing is in millimetres, ``(z, y, x)``, taken from the column norms of the
affine. Intensities are Hounsfield units.

A file is refused before any voxel is read (implausible size or geometry,
truncated data: :mod:`kits_keras.nifti_checks`) with :class:`CaseError`, one
line naming the file. Files are written atomically
(:func:`kits_keras.files.atomic_write`).
"""

import dataclasses
import gzip
import os
import re
import zlib

import numpy as np

from kits_keras import files
from kits_keras import nifti_checks
from kits_keras.files import CaseError
from kits_keras.orientation import FILE_LAYOUT
from kits_keras.orientation import KITS19_ORIENTATION
from kits_keras.orientation import inverse
from kits_keras.orientation import nib
from kits_keras.orientation import orientation_to
from kits_keras.orientation import to_file_layout


IMAGE_FILE = "imaging.nii.gz"
LABELS_FILE = "segmentation.nii.gz"
LABEL_VALUES = (0, 1, 2)
CLASS_NAMES = ("background", "kidney", "tumour")
# KiTS21 and KiTS23 add label 3, cyst.
KITS23_LABEL_VALUES = (0, 1, 2, 3)
KITS23_CLASS_NAMES = CLASS_NAMES + ("cyst",)
_CASE_DIR = re.compile(r"^case_\d{5}$")



@dataclasses.dataclass(frozen=True)
class Volume:
    """One 3-D volume with its geometry.

    Attributes:
        array: np.ndarray. Voxel values in ``(z, y, x)`` order.
        spacing: tuple of 3 floats. Voxel size in mm, ``(z, y, x)``.
        affine: np.ndarray. The file's 4x4 voxel-to-world matrix (for the
            file's voxel layout, not ``array``'s; see :attr:`array_affine`).
        header: nibabel header of the file, or None.
        orientation: tuple of 3 ``(axis, flip)`` pairs, a nibabel
            orientation array: file axis ``i`` became array axis
            ``orientation[i][0]``, reversed when ``orientation[i][1]`` is
            -1 (``array = nibabel.orientations.apply_orientation(
            file_array, orientation)``). Defaults to :data:`FILE_LAYOUT`.
        path: str. Where it was read from ("" when built in memory).
    """

    array: np.ndarray
    spacing: tuple
    affine: np.ndarray
    header: object = None
    orientation: tuple = FILE_LAYOUT
    path: str = ""

    @property
    def voxel_volume_ml(self):
        """Volume of one voxel in mL."""
        return voxel_ml(self.spacing)

    @property
    def array_affine(self):
        """The voxel-to-world matrix of :attr:`array` (not of the file)."""
        ornt = np.asarray(self.orientation, dtype=np.float64)
        file_shape = to_file_layout(self.array, self.orientation).shape
        return np.asarray(self.affine, np.float64) @ (
            nib.orientations.inv_ornt_aff(ornt, file_shape))


@dataclasses.dataclass(frozen=True)
class Case:
    """One KiTS19 case: CT in HU and optionally labels on the same grid.

    Attributes:
        case_id: str. ``case_XXXXX`` (or the file stem for a lone image).
        image: Volume. float32 HU.
        labels: Volume or None. uint8 in {0, 1, 2}.
    """

    case_id: str
    image: Volume
    labels: object = None

    @property
    def spacing(self):
        return self.image.spacing


def voxel_ml(spacing):
    """Volume in mL of one voxel of ``spacing`` (mm; 1 mL = 1000 mm^3).

    >>> voxel_ml((2.0, 1.0, 0.5))
    0.001
    """
    return float(np.prod(spacing)) / 1000.0


def class_names(num_classes=3):
    """Names of labels ``0 .. num_classes - 1``: KiTS19's three
    (:data:`CLASS_NAMES`) or KiTS23's four (:data:`KITS23_CLASS_NAMES`).

    >>> class_names(4)
    ('background', 'kidney', 'tumour', 'cyst')
    """
    if num_classes not in (3, 4):
        raise ValueError(f"num_classes must be 3 (KiTS19) or 4 (KiTS23). "
                         f"Received: num_classes={num_classes}")
    return KITS23_CLASS_NAMES[:num_classes]


def label_volumes_ml(labels, spacing, num_classes=3):
    """Kidney (label 1), tumour (label 2) and their sum in mL; with
    KiTS23's classes also cyst (label 3) and kidney + tumour + cyst.

    Args:
        labels: integer array ``(z, y, x)``.
        spacing: ``(z, y, x)`` voxel size in mm.
        num_classes: int. Classes of the label map (the model config's
            ``num_classes``): 3 (KiTS19) or 4 (KiTS23). Defaults to 3.

    Returns:
        dict of floats: ``kidney_ml``, ``tumour_ml``,
        ``kidney_and_tumour_ml``; with 4 classes also ``cyst_ml`` and
        ``kidney_and_masses_ml`` (labels 1-3, KiTS23's first evaluation
        class).

    >>> labels = np.array([[[0, 1, 1, 2, 3]]])
    >>> label_volumes_ml(labels, (10.0, 10.0, 10.0), num_classes=4)["cyst_ml"]
    1.0
    """
    names = class_names(num_classes)
    # count_nonzero of a comparison: np.bincount on small ints is slow.
    counts = [int(np.count_nonzero(labels == v))
              for v in range(1, len(names))]
    ml = voxel_ml(spacing)
    volumes = {
        "kidney_ml": float(counts[0] * ml),
        "tumour_ml": float(counts[1] * ml),
        "kidney_and_tumour_ml": float((counts[0] + counts[1]) * ml),
    }
    if num_classes == 4:
        volumes["cyst_ml"] = float(counts[2] * ml)
        volumes["kidney_and_masses_ml"] = float(sum(counts) * ml)
    return volumes


def read_volume(path, dtype=np.float32, orientation=KITS19_ORIENTATION):
    """Reads a NIfTI file into a :class:`Volume`, reoriented.

    The header is checked before any voxel is read (limits:
    :mod:`kits_keras.nifti_checks`), then the array is brought to
    ``orientation`` by flips and a transpose (views), copied once into
    C order together with the cast to ``dtype``.

    Args:
        path: str. A ``.nii`` or ``.nii.gz`` file.
        dtype: numpy dtype of the returned array, or None to keep the
            file's (scaled) dtype. Defaults to float32.
        orientation: 3 nibabel axis codes the array axes will point to.
            Defaults to :data:`KITS19_ORIENTATION`.

    Raises:
        CaseError: unreadable, truncated, implausibly large or non-3-D
            file, or degenerate geometry. One line starting with the path.
    """
    path = os.fspath(path)
    nifti_checks.check_readable(path)
    try:
        nifti_checks.check_header(path, nifti_checks.read_header(path))
        img = nib.load(path)
        affine = np.asarray(img.affine, dtype=np.float64)
        spacing = nifti_checks.check_geometry(path, affine, img.shape)
        data = nifti_checks.read_data(path, img)
    except CaseError:
        raise
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile,
            nib.filebasedimages.ImageFileError,
            nib.spatialimages.HeaderDataError) as err:
        raise CaseError(f"{path}: cannot read NIfTI ({err})") from None
    return oriented_volume(data, spacing, affine, img.header, orientation,
                           path, dtype)


def oriented_volume(data, spacing, affine, header, orientation, path=None,
                    dtype=None):
    """A :class:`Volume` of ``data`` (file axes, ``spacing`` in mm along
    them) reoriented to ``orientation``: the end of every reader (NIfTI,
    DICOM series, nibabel image)."""
    ornt = orientation_to(affine, orientation)
    array = np.ascontiguousarray(
        nib.orientations.apply_orientation(data, ornt), dtype=dtype)
    spacing = tuple(float(spacing[axis]) for axis, _ in inverse(ornt))
    return Volume(array, spacing, affine, header, ornt, path)


def read_image(path, orientation=KITS19_ORIENTATION):
    """Reads a CT image (HU) and checks that every voxel is finite."""
    volume = read_volume(path, np.float32, orientation)
    if not np.all(np.isfinite(volume.array)):
        bad = int(np.size(volume.array) - np.isfinite(volume.array).sum())
        raise CaseError(f"{volume.path}: {bad} non-finite intensities")
    return volume


def read_labels(path, orientation=KITS19_ORIENTATION,
                label_values=LABEL_VALUES):
    """Reads a label volume and checks its values are in ``label_values``.

    Args:
        path: str. A ``.nii`` or ``.nii.gz`` file.
        orientation: see :func:`read_volume`.
        label_values: consecutive ints from 0 the labels may take. Defaults
            to KiTS19's :data:`LABEL_VALUES` (KiTS23 adds 3, cyst).
    """
    allowed = ", ".join(str(v) for v in label_values)
    # Keep the stored dtype: KiTS19 labels are uint8, and a min/max check
    # on them is ~50x faster than np.unique on a float copy (834x512x512).
    volume = read_volume(path, None, orientation)
    values = volume.array
    if not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.isfinite(values)) or np.any(
            values != np.round(values)
        ):
            raise CaseError(f"{volume.path}: labels must be integers "
                            f"{allowed}")
    lo, hi = min(label_values), max(label_values)
    if values.min() < lo or values.max() > hi:
        bad = values[(values < lo) | (values > hi)]
        unexpected = [int(v) for v in np.unique(bad)[:10]]
        raise CaseError(
            f"{volume.path}: label values {unexpected} outside {{{allowed}}}"
        )
    return dataclasses.replace(volume, array=values.astype(np.uint8,
                                                           copy=False))


def check_same_grid(image, labels):
    """Raises CaseError unless two volumes lie on the same world grid.

    Compares the arrays (both reoriented on reading) and their affines, so
    two files of one grid stored in different axis orders agree.
    """
    if image.array.shape != labels.array.shape:
        raise CaseError(
            f"{labels.path}: shape {labels.array.shape} does not match "
            f"{image.path} shape {image.array.shape}"
        )
    if not np.allclose(image.array_affine, labels.array_affine, rtol=1e-4,
                       atol=1e-3):
        raise CaseError(
            f"{labels.path}: affine does not match {image.path}"
        )


def load_case(case_dir, require_labels=True):
    """Reads a KiTS19 case folder ``case_XXXXX/``.

    Args:
        case_dir: str. Folder holding ``imaging.nii.gz`` and, for training
            data, ``segmentation.nii.gz``.
        require_labels: bool. Raise if the segmentation is missing. Defaults
            to True.

    Returns:
        Case with ``image`` (float32 HU) and ``labels`` (uint8) or None.
    """
    case_dir = os.fspath(case_dir).rstrip("/")
    if not os.path.isdir(case_dir):
        raise CaseError(f"{case_dir}: case folder not found")
    image = read_image(os.path.join(case_dir, IMAGE_FILE))
    labels_path = os.path.join(case_dir, LABELS_FILE)
    labels = None
    if os.path.exists(labels_path):
        labels = read_labels(labels_path)
        check_same_grid(image, labels)
    elif require_labels:
        raise CaseError(f"{labels_path}: file not found")
    return Case(os.path.basename(case_dir), image, labels)


def find_cases(folder):
    """Sorted ``case_XXXXX`` folders directly under ``folder``."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CaseError(f"{folder}: folder not found")
    names = sorted(n for n in os.listdir(folder) if _CASE_DIR.match(n))
    return [os.path.join(folder, n) for n in names]


def is_nifti(path):
    return os.fspath(path).endswith((".nii", ".nii.gz"))


def nifti_stem(path):
    """``/a/case.nii.gz`` -> ``case``."""
    name = os.path.basename(os.fspath(path))
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def save_nifti(path, array, affine, header=None, orientation=FILE_LAYOUT):
    """Writes an array as NIfTI in its file's layout, atomically.

    Args:
        path: str. Destination ``.nii`` or ``.nii.gz``.
        array: np.ndarray; its dtype is kept.
        affine: 4x4 voxel-to-world matrix of the file layout.
        header: nibabel header to copy (shape and dtype are updated), or None.
        orientation: how the file layout became ``array``
            (:attr:`Volume.orientation`); undone (a view) before writing.
            Defaults to :data:`FILE_LAYOUT` (``array`` is the file layout).
    """
    file_array = to_file_layout(np.asarray(array), orientation)
    new_header = header.copy() if header is not None else None
    img = nib.Nifti1Image(file_array, affine, new_header)
    img.set_data_dtype(file_array.dtype)
    if new_header is not None:
        # Stored intensities must not be rescaled on reading.
        img.header.set_slope_inter(1.0, 0.0)
    return files.atomic_write(path, lambda tmp: nib.save(img, tmp))


def save_like(path, array, reference):
    """Writes ``array`` on the grid of ``reference`` (a :class:`Volume`):
    in its file's voxel layout and orientation, with its affine."""
    if tuple(array.shape) != tuple(reference.array.shape):
        raise ValueError(
            f"Array shape {array.shape} differs from the reference "
            f"{reference.path} shape {reference.array.shape}"
        )
    return save_nifti(
        path, array, reference.affine, reference.header,
        reference.orientation
    )
