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

Refused before any voxel is read (:func:`read_volume` raises
:class:`CaseError`, one line naming the file), with limits far beyond any
KiTS19/KiTS23 case (at most 1059 x 512 x 512 voxels, 796 in-plane; voxels
0.4 to 5 mm):

* more than :data:`MAX_AXIS_VOXELS` voxels along an axis, or more than
  :data:`MAX_VOXELS` in all (1024 x 1024 x 512, twice the largest KiTS case,
  2 GiB as float32);
* a voxel size outside :data:`SPACING_RANGE_MM`, or an extent over
  :data:`MAX_EXTENT_MM` along an axis;
* no voxel size at all (zero ``pixdim`` and no qform/sform, where nibabel
  would assume 1 mm), a non-finite or singular affine;
* data shorter than the header declares. Decompression stops at the
  declared size, and the array is filled as the data arrives, so a small
  file declaring a huge volume never takes memory.
"""

import dataclasses
import gzip
import json
import os
import re
import tempfile
import zlib

import numpy as np


class _Nibabel:
    """``nibabel``, imported on first use: the compute core (models,
    sliding window, preprocessing arithmetic) runs where nibabel is not
    installed, such as the GPU host of ``benchmarks/gpu_check.py``."""

    def __getattr__(self, name):
        import nibabel

        return getattr(nibabel, name)


nib = _Nibabel()

IMAGE_FILE = "imaging.nii.gz"
LABELS_FILE = "segmentation.nii.gz"
LABEL_VALUES = (0, 1, 2)
CLASS_NAMES = ("background", "kidney", "tumour")
_CASE_DIR = re.compile(r"^case_\d{5}$")

# The voxel orientation of KiTS19's volumes, and so of every array this
# module returns (nibabel axis codes: where each array axis points).
KITS19_ORIENTATION = ("I", "P", "L")
# ``Volume.orientation`` of an array kept in the file's own layout.
FILE_LAYOUT = ((0, 1), (1, 1), (2, 1))

# Plausibility limits, checked on the header before anything is allocated.
MAX_AXIS_VOXELS = 4096
MAX_VOXELS = 2**29  # 1024 x 1024 x 512; KiTS' largest: 1059 x 512 x 512
SPACING_RANGE_MM = (0.1, 20.0)
MAX_EXTENT_MM = 3000.0
# Header plus extensions: ``vox_offset`` beyond this is not a NIfTI we read.
_MAX_DATA_OFFSET = 2**26
# Bytes decompressed per read while filling an array.
_READ_CHUNK = 2**24


class CaseError(ValueError):
    """A file or case that cannot be used; the message names the file."""


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


def label_volumes_ml(labels, spacing):
    """Kidney (label 1), tumour (label 2) and their sum in mL.

    Args:
        labels: integer array ``(z, y, x)``.
        spacing: ``(z, y, x)`` voxel size in mm.

    Returns:
        dict of floats: ``kidney_ml``, ``tumour_ml``,
        ``kidney_and_tumour_ml``.
    """
    # count_nonzero of a comparison: np.bincount on small ints is slow.
    kidney, tumour = (int(np.count_nonzero(labels == v)) for v in (1, 2))
    ml = voxel_ml(spacing)
    return {
        "kidney_ml": float(kidney * ml),
        "tumour_ml": float(tumour * ml),
        "kidney_and_tumour_ml": float((kidney + tumour) * ml),
    }


def check_orientation(codes):
    """``codes`` as a tuple of 3 nibabel axis codes, one per world axis.

    >>> check_orientation("IPL")
    ('I', 'P', 'L')

    Raises:
        ValueError: unless ``codes`` names each of L/R, A/P, S/I once.
    """
    pairs = ("LR", "PA", "IS")
    codes = tuple(str(c) for c in codes) if codes is not None else ()
    used = sorted(i for c in codes for i, p in enumerate(pairs) if c in p)
    if len(codes) != 3 or used != [0, 1, 2]:
        raise ValueError(
            "An orientation is 3 axis codes, one of L/R, one of A/P and one "
            f"of S/I (e.g. 'IPL'). Received: {codes!r}")
    return codes


def orientation_to(affine, codes=KITS19_ORIENTATION):
    """The orientation taking a file with ``affine`` to axis ``codes``.

    Flips as well as permutations: each file axis goes to the array axis
    nearest its world direction, reversed where it points the other way.

    >>> import numpy as np
    >>> orientation_to(np.diag([0.8, 0.8, 3.0, 1.0]))  # RAS -> IPL
    ((2, -1), (1, -1), (0, -1))

    Returns:
        tuple of 3 ``(axis, flip)`` int pairs (:attr:`Volume.orientation`).
    """
    start = nib.orientations.io_orientation(np.asarray(affine, np.float64))
    end = nib.orientations.axcodes2ornt(check_orientation(codes))
    ornt = nib.orientations.ornt_transform(start, end)
    return tuple((int(a), int(f)) for a, f in ornt)


def _inverse(orientation):
    inverse = [None] * 3
    for axis, (target, flip) in enumerate(orientation):
        inverse[int(target)] = (axis, int(flip))
    return tuple(inverse)


def to_file_layout(array, orientation):
    """The view of a reoriented ``array`` in its file's voxel layout."""
    return nib.orientations.apply_orientation(array, _inverse(orientation))


def _check_readable(path):
    if not os.path.exists(path):
        raise CaseError(f"{path}: file not found")
    if os.path.isdir(path):
        raise CaseError(f"{path}: is a folder, expected a NIfTI file")


def _header_of(path):
    """The file's NIfTI header as stored (nibabel's fixes not applied)."""
    with nib.openers.ImageOpener(path) as f:
        block = f.read(540)
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        size = klass.template_dtype.itemsize
        for order in "<>":
            if len(block) >= size and int(np.frombuffer(
                    block[:4], order + "i4")[0]) == size:
                return klass(block[:size], check=False)
    raise CaseError(f"{path}: not a NIfTI-1 or NIfTI-2 file")


def _check_header(path, header):
    """Refuses, before any voxel is read, what would exhaust memory or has
    no usable voxel size (limits: see the module docstring)."""
    shape = tuple(int(n) for n in header.get_data_shape())
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise CaseError(f"{path}: expected a 3-D volume, got shape {shape}")
    if min(shape) < 1 or max(shape) > MAX_AXIS_VOXELS:
        raise CaseError(
            f"{path}: declares {shape} voxels; each axis must have 1 to "
            f"{MAX_AXIS_VOXELS}")
    count = int(np.prod(shape, dtype=np.int64))
    if count > MAX_VOXELS:
        raise CaseError(
            f"{path}: declares {count:,} voxels {shape}, over the limit of "
            f"{MAX_VOXELS:,} (1024 x 1024 x 512)")
    dtype = header.get_data_dtype()
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise CaseError(f"{path}: unsupported voxel type {dtype}")
    offset = float(header["vox_offset"])
    if not 0 <= offset <= _MAX_DATA_OFFSET:
        raise CaseError(f"{path}: implausible data offset {offset:g} bytes")
    pixdim = np.asarray(header["pixdim"][1:4], np.float64)
    no_transform = int(header["qform_code"]) == 0 and int(
        header["sform_code"]) == 0
    if no_transform and not np.all(np.isfinite(pixdim) & (pixdim > 0)):
        raise CaseError(
            f"{path}: no voxel size: pixdim {pixdim.tolist()} and no "
            "qform/sform (nibabel would assume 1 mm)")


def _check_geometry(path, affine, shape):
    """Refuses a non-finite, singular or implausibly scaled affine."""
    if not np.all(np.isfinite(affine)):
        raise CaseError(f"{path}: non-finite affine (NaN or infinity in the "
                        "voxel-to-world matrix)")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing == 0) or abs(np.linalg.det(affine[:3, :3])) < (
            1e-3 * np.prod(spacing)):
        raise CaseError(f"{path}: singular affine (voxel axes not "
                        "independent), voxel size "
                        f"{np.round(spacing, 6).tolist()} mm")
    lo, hi = SPACING_RANGE_MM
    if np.any(spacing < lo) or np.any(spacing > hi):
        raise CaseError(
            f"{path}: voxel size {np.round(spacing, 6).tolist()} mm outside "
            f"the plausible {lo:g} to {hi:g} mm")
    extent = spacing * np.asarray(shape[:3])
    if np.any(extent > MAX_EXTENT_MM):
        raise CaseError(
            f"{path}: extent {np.round(extent).tolist()} mm, over "
            f"{MAX_EXTENT_MM:g} mm along an axis")
    return spacing


def _read_data(path, img):
    """The scaled voxel array in file layout, read without surprises.

    The array is allocated empty (the kernel hands out pages as they are
    written) and filled chunk by chunk as the (compressed) data arrives, so
    a small file declaring a large volume fails on its first missing byte
    without taking memory, and decompression stops at the declared size
    (trailing data of a gzip bomb is never inflated).
    """
    proxy = img.dataobj
    shape, dtype = tuple(proxy.shape), np.dtype(proxy.dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(size, np.uint8)
    done = 0
    with nib.openers.ImageOpener(path) as f:
        f.seek(int(proxy.offset))
        view = memoryview(raw)
        while done < size:
            count = f.readinto(view[done:done + _READ_CHUNK])
            if not count:
                break
            done += count
    if done < size:
        raise CaseError(f"{path}: truncated: holds {done:,} of the "
                        f"{size:,} data bytes its header declares")
    # NIfTI stores voxels Fortran-ordered: a transposed view, no copy.
    data = raw.view(dtype).reshape(shape[::-1]).T
    # Scaling as nibabel's ArrayProxy applies it (scl_slope, scl_inter).
    slope, inter = np.asanyarray(proxy.slope), np.asanyarray(proxy.inter)
    if np.can_cast(inter, slope.dtype):
        inter = inter.astype(slope.dtype)
    data = nib.volumeutils.apply_read_scaling(data, slope, inter)
    return data[..., 0] if data.ndim == 4 else data


def read_volume(path, dtype=np.float32, orientation=KITS19_ORIENTATION):
    """Reads a NIfTI file into a :class:`Volume`, reoriented.

    The header is checked before any voxel is read (see the module
    docstring for the limits), then the array is brought to
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
    _check_readable(path)
    try:
        _check_header(path, _header_of(path))
        img = nib.load(path)
        affine = np.asarray(img.affine, dtype=np.float64)
        spacing = _check_geometry(path, affine, img.shape)
        data = _read_data(path, img)
    except CaseError:
        raise
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile,
            nib.filebasedimages.ImageFileError,
            nib.spatialimages.HeaderDataError) as err:
        raise CaseError(f"{path}: cannot read NIfTI ({err})") from None
    ornt = orientation_to(affine, orientation)
    array = nib.orientations.apply_orientation(data, ornt)
    array = np.ascontiguousarray(array, dtype=dtype)
    spacing = tuple(float(spacing[axis]) for axis, _ in _inverse(ornt))
    return Volume(array, spacing, affine, img.header, ornt, path)


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


# Temporary files of :func:`atomic_write`:
# ``.<name>.kits-keras-tmp.<host>.<pid>.<random><suffix>``. The leading dot
# hides them from every folder scan of the package; host and pid tell
# :func:`sweep_temporaries` whether the writer is gone (``kill -9``).
TEMP_TAG = ".kits-keras-tmp."
_TEMP_NAME = re.compile(r"^\..+\.kits-keras-tmp\.(?P<host>[0-9a-f]{8})"
                        r"\.(?P<pid>\d+)\.")


def _host_tag():
    import hashlib
    import socket

    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def is_temporary(name):
    """Whether ``name`` is a temporary file of :func:`atomic_write`."""
    return _TEMP_NAME.match(os.path.basename(os.fspath(name))) is not None


def is_hidden(name):
    """Dot-files (temporaries, editor and OS files) are never data."""
    return os.path.basename(os.fspath(name).rstrip("/")).startswith(".")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_temporaries(folder):
    """Removes :func:`atomic_write` temporaries left by a killed process.

    Only files of this host whose writing process no longer runs are
    removed (another process may be writing into the same folder).

    Returns:
        list of the removed paths.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    host, removed = _host_tag(), []
    for entry in os.scandir(folder):
        match = _TEMP_NAME.match(entry.name)
        if (match and match["host"] == host and entry.is_file(
                follow_symlinks=False) and not _pid_alive(int(match["pid"]))):
            try:
                os.remove(entry.path)
            except FileNotFoundError:
                continue
            removed.append(entry.path)
    return removed


def atomic_write(path, write_fn):
    """Calls ``write_fn(tmp_path)`` then renames the result onto ``path``.

    The temporary file sits in the destination folder (so the rename is
    atomic) and keeps the destination's suffix (so writers that dispatch on
    it, such as nibabel, choose the right format). On failure it is removed
    and ``path`` is untouched. Its name (``.<name>.kits-keras-tmp.<host>.
    <pid>.<random><suffix>``) is hidden from folder scans and lets
    :func:`sweep_temporaries` remove it after a ``kill -9``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    suffix = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
    prefix = f".{name}{TEMP_TAG}{_host_tag()}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
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


def write_json(path, obj, default=None):
    """Writes ``obj`` as indented JSON and a final newline, through
    :func:`atomic_write` (the folder is created). ``default`` is passed to
    :func:`json.dump` (e.g. ``str`` for paths). Returns ``path``."""

    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, default=default)
            fh.write("\n")

    return atomic_write(path, write)


def first_line(err, limit=200):
    """An exception's message as one line of at most ``limit`` characters
    (Keras' weight-mismatch errors run to hundreds of lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    if len(lines) > 1:
        text += " ..."
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
    return atomic_write(path, lambda tmp: nib.save(img, tmp))


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
