"""Running ``kits-keras`` as a user does, for the bad-input tables.

Each call starts a real process running the ``kits-keras`` entry point, so the exit code,
stderr and peak memory are the ones a user sees. The peak resident set of
the child comes from ``os.wait4`` (Linux ``ru_maxrss``, KiB), not from
``RLIMIT_AS``: JAX and TensorFlow reserve far more address space than they
touch. A small launcher process forks ``kits-keras``: Linux keeps
``ru_maxrss`` across ``exec``, so a process started straight from the test
process would report the test process's peak (pytest with TensorFlow
loaded), not its own.
"""

import dataclasses
import hashlib
import os
import signal
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
# Forks and execs ``python -c ENTRY ARGS`` (argv: fd, ENTRY, ARGS...), waits
# and writes "<wait status> <ru_maxrss KiB>" of that child to fd.
_LAUNCH = """import os, sys
fd = int(sys.argv[1])
pid = os.fork()
if pid == 0:
    os.close(fd)
    os.execv(sys.executable, [sys.executable, "-c", *sys.argv[2:]])
_, status, usage = os.wait4(pid, 0)
os.write(fd, f"{status} {usage.ru_maxrss}".encode())
"""


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
    read_end, write_end = os.pipe()
    with open(os.devnull, "rb") as stdin:
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, str(write_end), _ENTRY,
             *map(str, args)],
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=full_env, cwd=cwd or REPO, text=True, pass_fds=(write_end,),
            start_new_session=True)
    os.close(write_end)
    chunks = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda k=k, s=s: chunks[k].append(
        s.read()), daemon=True)
        for k, s in (("out", proc.stdout), ("err", proc.stderr))]
    for reader in readers:
        reader.start()
    timer = threading.Timer(
        timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        proc.wait()
    finally:
        timer.cancel()
    with os.fdopen(read_end, "rb") as report:
        fields = report.read().split()
    for reader in readers:
        reader.join()
    if len(fields) == 2:  # the launcher saw kits-keras end
        returncode = os.waitstatus_to_exitcode(int(fields[0]))
        peak = int(fields[1]) / 1024.0
    else:  # the launcher itself was killed (timeout)
        returncode, peak = proc.returncode, float("nan")
    return CliResult(returncode, "".join(chunks["out"]),
                     "".join(chunks["err"]), peak)


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
