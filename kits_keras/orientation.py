"""Voxel orientation: from a file's affine to KiTS19's axes and back.

Every volume is read into one voxel orientation, KiTS19's
(:data:`KITS19_ORIENTATION`, nibabel axis codes ``("I", "P", "L")``: axis 0
runs head to feet across slices, axis 1 front to back, axis 2 towards the
patient's left), whatever the file's layout: axes are permuted *and*
flipped. An orientation is a tuple of 3 ``(axis, flip)`` pairs, nibabel's
``ornt`` (:attr:`kits_keras.io.Volume.orientation`).
"""

import numpy as np


class _Nibabel:
    """``nibabel``, imported on first use: the compute core (models,
    sliding window, preprocessing arithmetic) runs where nibabel is not
    installed, such as the GPU host of ``benchmarks/gpu_check.py``."""

    def __getattr__(self, name):
        import nibabel

        return getattr(nibabel, name)


nib = _Nibabel()


# The voxel orientation of KiTS19's volumes, and so of every array
# kits_keras.io's readers return (nibabel axis codes: where each array axis
# points).
KITS19_ORIENTATION = ("I", "P", "L")
# ``Volume.orientation`` of an array kept in the file's own layout.
FILE_LAYOUT = ((0, 1), (1, 1), (2, 1))


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


def inverse(orientation):
    """The orientation that undoes ``orientation``."""
    inverse = [None] * 3
    for axis, (target, flip) in enumerate(orientation):
        inverse[int(target)] = (axis, int(flip))
    return tuple(inverse)


def to_file_layout(array, orientation):
    """The view of a reoriented ``array`` in its file's voxel layout."""
    return nib.orientations.apply_orientation(array, inverse(orientation))
