"""What a prepared dataset was built from, and how a case folder differs.

``kits-keras prepare`` reuses a finished dataset only when the case files
and the code that turned them into examples are the ones it was built from
(``metadata["source"]`` of the kits19 and kits23 builders); anything else
is an error unless ``--rebuild``. Shared by both builders.
"""

import hashlib
import inspect

from etils import epath

from kits_keras import io
from kits_keras import nifti_checks
from kits_keras.data import intensity
from kits_keras.data import preprocessing

# Datasets built before ``metadata["foreground_samples"]`` was recorded
# stored at most this many coordinates per class (then a fixed number).
UNRECORDED_FOREGROUND_SAMPLES = 10_000


def code_version(code_files=()):
    """sha256 (16 hex digits) of the code that turns case files into
    examples: ``kits_keras.data.preprocessing``,
    ``kits_keras.data.intensity``, ``kits_keras.io``,
    ``kits_keras.nifti_checks`` (how the voxels are read) and
    ``code_files`` (the builder's own modules).

    Any edit to them (a comment too) changes it, so a dataset is never
    silently reused after the preprocessing changed; a spurious change
    costs one ``--rebuild``.
    """
    digest = hashlib.sha256()
    for path in (*code_files, inspect.getsourcefile(preprocessing),
                 inspect.getsourcefile(intensity), inspect.getsourcefile(io),
                 inspect.getsourcefile(nifti_checks)):
        digest.update(epath.Path(path).read_bytes())
    return digest.hexdigest()[:16]


def source_fingerprint(manual_dir, case_dirs, foreground_samples,
                       code_files=()):
    """What a dataset built from ``manual_dir`` now would be built from.

    Args:
        manual_dir: the case folder (recorded, informative only).
        case_dirs: ``{case_id: folder}`` of the labelled cases it holds.
        foreground_samples: coordinates stored per class and case.
        code_files: the builder's modules (:func:`code_version`).

    Returns a JSON-able dict: ``folder`` (absolute path), ``code``
    (:func:`code_version`), ``foreground_samples`` and ``cases``: case id
    -> ``{file name: file_fingerprint(...)}`` of its image and labels.
    """
    cases = {}
    for case_id, case_dir in sorted(case_dirs.items()):
        cases[case_id] = {
            name: file_fingerprint(epath.Path(case_dir) / name)
            for name in (io.IMAGE_FILE, io.LABELS_FILE)}
    return {"folder": str(epath.Path(manual_dir).resolve()),
            "code": code_version(code_files),
            "foreground_samples": int(foreground_samples), "cases": cases}


def file_fingerprint(path):
    """``[size, mtime (s), last 8 bytes (hex)]`` of a file, None if it
    cannot be read.

    The last 8 bytes of a gzip stream are the CRC-32 and the length of the
    whole uncompressed content, so a re-saved ``.nii.gz`` with other voxels
    differs even at the same size within the same second (file systems
    reached through ``epath`` give whole seconds). Hashing every file
    instead would read all 28 GB of KiTS19 at each ``prepare``.
    """
    path = epath.Path(path)
    try:
        stat = path.stat()
        with path.open("rb") as f:
            f.seek(max(0, stat.length - 8))
            tail = f.read(8)
    except OSError:
        return None  # e.g. no image: the build reports the case
    return [int(stat.length), int(stat.mtime), tail.hex()]


def fingerprint_differences(stored, current):
    """Short phrases saying how ``current`` differs from ``stored`` (empty
    when the dataset may be reused). ``stored`` None: built without one."""
    if not stored:
        return ["no record of what it was built from (an older kits-keras "
                "or an unfinished build)"]
    old, new = stored.get("cases", {}), current["cases"]
    phrases = []
    for verb, ids in (
            ("added", sorted(set(new) - set(old))),
            ("removed", sorted(set(old) - set(new))),
            ("changed", sorted(c for c in set(old) & set(new)
                               if _as_lists(old[c]) != _as_lists(new[c])))):
        if ids:
            shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
            phrases.append(f"{len(ids)} case(s) {verb}: {shown}")
    if stored.get("code") != current["code"]:
        phrases.append("preprocessing code changed")
    old_samples = stored.get("foreground_samples",
                             UNRECORDED_FOREGROUND_SAMPLES)
    if old_samples != current["foreground_samples"]:
        phrases.append(f"foreground_samples {old_samples} -> "
                       f"{current['foreground_samples']}")
    return phrases


def _as_lists(files):
    """JSON round trips turn lists into lists, but be safe with tuples."""
    return {k: list(v) if v is not None else None for k, v in files.items()}
