"""Refusing a NIfTI file before its voxels are read, and reading them.

:func:`kits_keras.io.read_volume` runs these checks (each raises
:class:`kits_keras.files.CaseError`, one line naming the file), with limits
far beyond any KiTS19/KiTS23 case (at most 1059 x 512 x 512 voxels, 796
in-plane; voxels 0.4 to 5 mm):

* more than :data:`MAX_AXIS_VOXELS` voxels along an axis, or more than
  :data:`MAX_VOXELS` in all (1024 x 1024 x 512, twice the largest KiTS case,
  2 GiB as float32);
* a voxel size outside :data:`SPACING_RANGE_MM`, or an extent over
  :data:`MAX_EXTENT_MM` along an axis;
* no voxel size at all (zero ``pixdim`` and no qform/sform, where nibabel
  would assume 1 mm), a non-finite or singular affine;
* data shorter than the header declares. Decompression stops at the
  declared size, and the array is filled as the data arrives, so a small
  file declaring a huge volume never takes memory (:func:`read_data`).

The DICOM reader and :class:`kits_keras.Segmenter` reuse the limits and
:func:`check_geometry`. nibabel is imported on first use, as in
:mod:`kits_keras.io`.
"""

import os

import numpy as np

from kits_keras.files import CaseError

# Plausibility limits, checked on the header before anything is allocated.
MAX_AXIS_VOXELS = 4096
MAX_VOXELS = 2**29  # 1024 x 1024 x 512; KiTS' largest: 1059 x 512 x 512
SPACING_RANGE_MM = (0.1, 20.0)
MAX_EXTENT_MM = 3000.0
# Header plus extensions: ``vox_offset`` beyond this is not a NIfTI we read.
_MAX_DATA_OFFSET = 2**26
# Bytes decompressed per read while filling an array.
_READ_CHUNK = 2**24


def check_readable(path):
    if not os.path.exists(path):
        raise CaseError(f"{path}: file not found")
    if os.path.isdir(path):
        raise CaseError(f"{path}: is a folder, expected a NIfTI file")


def read_header(path):
    """The file's NIfTI header as stored (nibabel's fixes not applied)."""
    import nibabel as nib

    with nib.openers.ImageOpener(path) as f:
        block = f.read(540)
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        size = klass.template_dtype.itemsize
        for order in "<>":
            if len(block) >= size and int(np.frombuffer(
                    block[:4], order + "i4")[0]) == size:
                return klass(block[:size], check=False)
    raise CaseError(f"{path}: not a NIfTI-1 or NIfTI-2 file")


def check_header(path, header):
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


def check_geometry(path, affine, shape):
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


def read_data(path, img):
    """The scaled voxel array in file layout, read without surprises.

    The array is allocated empty (the kernel hands out pages as they are
    written) and filled chunk by chunk as the (compressed) data arrives, so
    a small file declaring a large volume fails on its first missing byte
    without taking memory, and decompression stops at the declared size
    (trailing data of a gzip bomb is never inflated).

    Args:
        path: str. The file.
        img: the nibabel image of ``path`` (its ``dataobj`` proxy gives
            shape, dtype, data offset and scaling).
    """
    import nibabel as nib

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

