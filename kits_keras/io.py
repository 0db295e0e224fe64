"""Reading and writing KiTS19 cases and NIfTI volumes.

Arrays are returned in ``(z, y, x)`` order: axis 0 runs across slices. KiTS19
stores its volumes that way already (its affines map voxel axis 0 to the
patient's inferior-superior axis). A NIfTI stored the usual ``(x, y, z)`` way
is transposed on reading so that the voxel axis closest to inferior-superior
comes first, and transposed back on writing, so a segmentation written with
:func:`save_like` lies on the input's grid whatever its layout.

Spacing is in millimetres, ``(z, y, x)``, taken from the column norms of the
affine. Intensities are Hounsfield units.
"""

import dataclasses
import gzip
import os
import re
import tempfile
import zlib

import nibabel as nib
import numpy as np

IMAGE_FILE = "imaging.nii.gz"
LABELS_FILE = "segmentation.nii.gz"
LABEL_VALUES = (0, 1, 2)
CLASS_NAMES = ("background", "kidney", "tumour")
_CASE_DIR = re.compile(r"^case_\d{5}$")


class CaseError(ValueError):
    """A file or case that cannot be used; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Volume:
    """One 3-D volume with its geometry.

    Attributes:
        array: np.ndarray. Voxel values in ``(z, y, x)`` order.
        spacing: tuple of 3 floats. Voxel size in mm, ``(z, y, x)``.
        affine: np.ndarray. The file's 4x4 voxel-to-world matrix (for the
            axis order stored in the file, not ``array``'s).
        header: nibabel header of the file, or None.
        axes: tuple of 3 ints. ``array = file_array.transpose(axes)``.
        path: str. Where it was read from ("" when built in memory).
    """

    array: np.ndarray
    spacing: tuple
    affine: np.ndarray
    header: object = None
    axes: tuple = (0, 1, 2)
    path: str = ""

    @property
    def voxel_volume_ml(self):
        """Volume of one voxel in mL."""
        return float(np.prod(self.spacing)) / 1000.0


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


def slice_axis_order(affine):
    """The transpose that puts the voxel axis nearest world z first.

    Returns ``(a, b, c)`` with ``a`` the voxel axis whose direction has the
    largest inferior-superior component, then the remaining axes in the order
    of their world components ``y`` then ``x`` (falling back to file order).
    """
    direction = np.abs(np.asarray(affine, dtype=np.float64)[:3, :3])
    slice_axis = int(np.argmax(direction[2]))
    rest = [a for a in range(3) if a != slice_axis]
    # Keep the file order for the in-plane axes unless it is clearly (x, y).
    if direction[0, rest[0]] > direction[1, rest[0]] and (
        direction[1, rest[1]] > direction[0, rest[1]]
    ):
        rest = rest[::-1]
    return (slice_axis, *rest)


def _check_readable(path):
    if not os.path.exists(path):
        raise CaseError(f"{path}: file not found")
    if os.path.isdir(path):
        raise CaseError(f"{path}: is a folder, expected a NIfTI file")


def read_volume(path, dtype=np.float32):
    """Reads a NIfTI file into a :class:`Volume` in ``(z, y, x)`` order.

    Args:
        path: str. A ``.nii`` or ``.nii.gz`` file.
        dtype: numpy dtype of the returned array, or None to keep the
            file's (scaled) dtype. Defaults to float32.

    Raises:
        CaseError: unreadable, truncated or non-3-D file, or a degenerate
            affine. The message starts with the path.
    """
    path = os.fspath(path)
    _check_readable(path)
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile,
            nib.filebasedimages.ImageFileError) as err:
        raise CaseError(f"{path}: cannot read NIfTI ({err})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseError(
            f"{path}: expected a 3-D volume, got shape {tuple(data.shape)}"
        )
    affine = np.asarray(img.affine, dtype=np.float64)
    file_spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(np.isfinite(file_spacing)) or np.any(file_spacing <= 0):
        raise CaseError(f"{path}: degenerate affine, voxel size {file_spacing}")
    axes = slice_axis_order(affine)
    array = np.ascontiguousarray(np.transpose(data, axes))
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    spacing = tuple(float(file_spacing[a]) for a in axes)
    return Volume(array, spacing, affine, img.header, axes, path)


def read_image(path):
    """Reads a CT image (HU) and checks that every voxel is finite."""
    volume = read_volume(path, np.float32)
    if not np.all(np.isfinite(volume.array)):
        bad = int(np.size(volume.array) - np.isfinite(volume.array).sum())
        raise CaseError(f"{volume.path}: {bad} non-finite intensities")
    return volume


def read_labels(path):
    """Reads a label volume and checks its values are in {0, 1, 2}."""
    # Keep the stored dtype: KiTS19 labels are uint8, and a min/max check
    # on them is ~50x faster than np.unique on a float copy (834x512x512).
    volume = read_volume(path, None)
    values = volume.array
    if not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.isfinite(values)) or np.any(
            values != np.round(values)
        ):
            raise CaseError(f"{volume.path}: labels must be integers 0, 1, 2")
    lo, hi = min(LABEL_VALUES), max(LABEL_VALUES)
    if values.min() < lo or values.max() > hi:
        bad = values[(values < lo) | (values > hi)]
        unexpected = [int(v) for v in np.unique(bad)[:10]]
        raise CaseError(
            f"{volume.path}: label values {unexpected} outside {{0, 1, 2}}"
        )
    return dataclasses.replace(volume, array=values.astype(np.uint8,
                                                           copy=False))


def check_same_grid(image, labels):
    """Raises CaseError unless two volumes share shape and affine."""
    if image.array.shape != labels.array.shape:
        raise CaseError(
            f"{labels.path}: shape {labels.array.shape} does not match "
            f"{image.path} shape {image.array.shape}"
        )
    if not np.allclose(image.affine, labels.affine, rtol=1e-4, atol=1e-3):
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


def atomic_write(path, write_fn):
    """Calls ``write_fn(tmp_path)`` then renames the result onto ``path``.

    The temporary file sits in the destination folder (so the rename is
    atomic) and keeps the destination's suffix (so writers that dispatch on
    it, such as nibabel, choose the right format). On failure it is removed
    and ``path`` is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    suffix = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write_fn(tmp)
        # mkstemp makes the file private (0600); give it the permissions a
        # plain open() would have (0666 less the umask).
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _umask():
    """The process umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set-and-restore (not thread-safe)
    os.umask(mask)
    return mask


def save_nifti(path, array, affine, header=None, axes=(0, 1, 2)):
    """Writes a ``(z, y, x)`` array as NIfTI, atomically.

    Args:
        path: str. Destination ``.nii`` or ``.nii.gz``.
        array: np.ndarray in ``(z, y, x)`` order; its dtype is kept.
        affine: 4x4 voxel-to-world matrix of the file layout.
        header: nibabel header to copy (shape and dtype are updated), or None.
        axes: the transpose applied on reading (:attr:`Volume.axes`); its
            inverse restores the file layout.
    """
    array = np.asarray(array)
    file_array = np.transpose(array, np.argsort(axes))
    new_header = header.copy() if header is not None else None
    img = nib.Nifti1Image(file_array, affine, new_header)
    img.set_data_dtype(file_array.dtype)
    if new_header is not None:
        # Stored intensities must not be rescaled on reading.
        img.header.set_slope_inter(1.0, 0.0)
    return atomic_write(path, lambda tmp: nib.save(img, tmp))


def save_like(path, array, reference):
    """Writes ``array`` on the grid of ``reference`` (a :class:`Volume`)."""
    if tuple(array.shape) != tuple(reference.array.shape):
        raise ValueError(
            f"Array shape {array.shape} differs from the reference "
            f"{reference.path} shape {reference.array.shape}"
        )
    return save_nifti(
        path, array, reference.affine, reference.header, reference.axes
    )
