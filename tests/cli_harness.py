"""Running ``kits-keras`` as a user does, for the bad-input tables.

Each call starts a real process running the ``kits-keras`` entry point, so the exit code,
stderr and peak memory are the ones a user sees. The peak resident set of
the child comes from ``os.wait4`` (Linux ``ru_maxrss``, KiB), not from
``RLIMIT_AS``: JAX and TensorFlow reserve far more address space than they
touch.
"""

import dataclasses
import hashlib
import os
import subprocess
import sys
import threading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class CliResult:
    """What one ``kits-keras`` process did.

    Attributes:
        returncode: int. The exit status.
        stdout: str.
        stderr: str.
        peak_rss_mb: float. Peak resident set size of the process, MiB.
    """

    returncode: int
    stdout: str
    stderr: str
    peak_rss_mb: float

    @property
    def error_lines(self):
        """The non-empty stderr lines that are not log chatter."""
        return [line for line in self.stderr.splitlines()
                if line.strip() and not line.startswith(("WARNING", "I0000",
                                                         "E0000", "W0000"))]


# cli/main.py has no __main__ block; call the console-script entry point.
_ENTRY = "from cli.main import main; main(prog_name='kits-keras')"


def run_cli(args, env=None, cwd=None, timeout=600):
    """Runs ``kits-keras ARGS`` in a subprocess.

    Args:
        args: list of str. Command line after ``kits-keras``.
        env: dict of extra environment variables.
        cwd: working directory (default: the repository).
        timeout: seconds.

    Returns:
        CliResult.
    """
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH",
                                                               "")
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    full_env.update(env or {})
    with open(os.devnull, "rb") as stdin:
        proc = subprocess.Popen(
            [sys.executable, "-c", _ENTRY, *map(str, args)],
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=full_env, cwd=cwd or REPO, text=True)
    chunks = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda k=k, s=s: chunks[k].append(
        s.read()), daemon=True)
        for k, s in (("out", proc.stdout), ("err", proc.stderr))]
    for reader in readers:
        reader.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        # wait4, not Popen.wait: it returns this child's own rusage (the
        # RUSAGE_CHILDREN figure is a maximum over every child so far).
        _, status, rusage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for reader in readers:
        reader.join()
    return CliResult(proc.returncode, "".join(chunks["out"]),
                     "".join(chunks["err"]), rusage.ru_maxrss / 1024.0)


def snapshot(folder):
    """``{relative path: sha256}`` of every file under ``folder``
    (hidden files included), to show that nothing was created or changed."""
    result = {}
    if not os.path.exists(folder):
        return result
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            result[os.path.relpath(path, folder)] = digest
    return result
