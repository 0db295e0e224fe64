"""Files written safely, and the one-line error naming a file.

Every file the package writes goes through :func:`atomic_write`: a hidden
temporary in the destination folder, renamed onto the destination once
complete, so a reader (or a run killed with ``kill -9``) never sees half a
file. :func:`sweep_temporaries` removes what a killed writer left;
:func:`is_hidden` keeps dot-files (those temporaries, editor and OS files)
out of every folder scan.

Bad input is refused with :class:`CaseError`, one line that starts with the
file's path; :func:`first_line` shortens a library's error to one line for
it.

Imports the standard library only: the GPU host of ``benchmarks/`` (no
nibabel) writes its results with :func:`write_json`.
"""

import json
import os
import re
import tempfile


class CaseError(ValueError):
    """A file or case that cannot be used; the message names the file."""


def first_line(err, limit=200):
    """An exception's message as one line of at most ``limit`` characters
    (Keras' weight-mismatch errors run to hundreds of lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    if len(lines) > 1:
        text += " ..."
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
    suffix = (".nii.gz" if name.endswith(".nii.gz")
              else os.path.splitext(name)[1])
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

