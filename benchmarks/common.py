"""Shared helpers for the scripts in ``benchmarks/``.

Every benchmark writes ``benchmarks/results/<name>.json`` with the machine,
package versions, date, raw figures and a ``summary``. Measurements run in
their own subprocess so that peak RSS belongs to one measurement only, and
peers (nnU-Net, MONAI, cc3d, torch) run in their own environment
(``/work/peers-venv``; ``--peers-python`` or ``$KITS_PEERS_PYTHON``).

Typical use in ``benchmarks/<name>.py``::

    from benchmarks import common          # after putting the repo on sys.path

    def measure_ours(case, repeats):        # module level, lazy imports inside
        ...
        return {"seconds": [...]}           # anything JSON-serialisable

    res = common.call_in_subprocess(__file__, "measure_ours",
                                    {"case": "case_00005", "repeats": 1})
    res["result"], res["peak_rss_mb"], res["wall_s"]
    common.write_results("preprocess", {"raw": ..., "summary": {...}})

A function called through :func:`call_in_subprocess` must live at module
level in a file whose top-level imports work in the target environment (the
peers env has no ``kits_keras``: import the project lazily inside functions).
"""

import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
THREAD_VARS = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "nnUNet_def_n_proc",
)
DEFAULT_PACKAGES = (
    "numpy", "scipy", "keras", "jax", "tensorflow-cpu", "tensorflow",
    "tensorflow-datasets", "nibabel",
)


# The instruction sets that decide TensorFlow's and oneDNN's CPU kernels.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def default_peers_python():
    """``$KITS_PEERS_PYTHON``, else ``<repo>/../peers-venv/bin/python`` if
    it exists, else None (peer measurements are then skipped)."""
    env = os.environ.get("KITS_PEERS_PYTHON")
    if env:
        return env
    guess = os.path.join(os.path.dirname(REPO), "peers-venv", "bin", "python")
    return guess if os.path.exists(guess) else None


def labels_dir():
    """Folder of real KiTS19 label volumes (``$KITS19_LABELS``)."""
    return os.environ.get(
        "KITS19_LABELS",
        os.path.join(os.path.dirname(REPO), "shared", "data", "kits19-labels"),
    )


def machine_info():
    """CPU model, cores, memory and GPUs of this machine (best effort)."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        # Others' work inflates timings; record how busy the machine was.
        "load_avg_1m_at_write": round(os.getloadavg()[0], 2),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    # Figures differ ~3x between AVX-512 and AVX2-only hosts.
                    flags = set(line.split(":", 1)[1].split())
                    info["cpu_flags"] = {f: f in flags for f in CPU_FLAGS}
                    break
        with open("/proc/meminfo") as fh:
            kb = int(fh.readline().split()[1])  # MemTotal
            info["memory_gb"] = round(kb / 1024**2, 1)
    except OSError:
        pass
    info["gpus"] = []
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total",
             "--format=csv,noheader"],
            capture_output=True, text=True, check=False,
        ).stdout
        info["gpus"] = [g.strip() for g in out.splitlines() if g.strip()]
    return info


def package_versions(names=DEFAULT_PACKAGES, python=None):
    """Installed versions of ``names`` in this env, or in ``python``'s."""
    if python is not None and python != sys.executable:
        code = (
            "import json,sys,importlib.metadata as m\n"
            "v={}\n"
            "for n in sys.argv[1:]:\n"
            "    try: v[n]=m.version(n)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(v))"
        )
        out = subprocess.run([python, "-c", code, *names], capture_output=True,
                             text=True, check=True).stdout
        return json.loads(out)
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def thread_env(threads):
    """A copy of the environment with every BLAS/OpenMP pool at ``threads``."""
    env = dict(os.environ)
    for var in THREAD_VARS:
        env[var] = str(threads)
    return env


_CHILD = r"""
import importlib.util, json, sys, time
path, func, kwargs_json, out = sys.argv[1:5]
sys.path.insert(0, {repo!r})
spec = importlib.util.spec_from_file_location("_bench_child", path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
t0 = time.perf_counter()
result = getattr(mod, func)(**json.loads(kwargs_json))
wall = time.perf_counter() - t0
with open(out, "w") as fh:
    json.dump({{"result": result, "wall_s": wall}}, fh)
"""


def call_in_subprocess(path, func, kwargs=None, python=None, threads=2,
                       timeout=1800, env=None):
    """Runs ``func(**kwargs)`` from the file ``path`` in a fresh process.

    Args:
        path: str. Python file defining ``func`` at module level.
        func: str. Function name; it must return JSON-serialisable data.
        kwargs: dict. JSON-serialisable keyword arguments.
        python: str. Interpreter (e.g. the peers env). Defaults to this one.
        threads: int. Value for OMP/MKL/OpenBLAS thread variables.
        timeout: float. Seconds before the child is killed.
        env: dict or None. Extra environment variables for the child
            (``ONEDNN_MAX_CPU_ISA=AVX2`` for the AVX2-only emulation).

    Returns:
        dict with ``result`` (what ``func`` returned), ``wall_s`` (seconds
        inside ``func``) and ``peak_rss_mb`` (the child's maximum resident
        set size from ``wait4``: interpreter, imports and inputs included,
        like ``/usr/bin/time -v``).

    Raises:
        RuntimeError: the child failed; the message holds its stderr tail.
    """
    python = python or sys.executable
    with tempfile.TemporaryDirectory(prefix="kits_bench_") as tmp:
        out = os.path.join(tmp, "result.json")
        log = os.path.join(tmp, "log.txt")
        args = [python, "-c", _CHILD.format(repo=REPO), os.path.abspath(path),
                func, json.dumps(kwargs or {}), out]
        with open(log, "w") as log_fh:
            proc = subprocess.Popen(args, stdout=log_fh, stderr=log_fh,
                                    env={**thread_env(threads),
                                         **(env or {})})
            deadline = time.monotonic() + timeout
            # wait4 gives this child's own rusage (RUSAGE_CHILDREN would
            # report the maximum over every child so far).
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0 or not os.path.exists(out):
            with open(log) as fh:
                tail = fh.read()[-3000:]
            raise RuntimeError(
                f"{func} in {path} failed (exit {proc.returncode}):\n{tail}"
            )
        with open(out) as fh:
            data = json.load(fh)
    data["peak_rss_mb"] = round(usage.ru_maxrss / 1024.0, 1)
    return data


def result_header(name, peers_python=None):
    """``benchmark``, ``date`` (UTC), ``machine`` and ``versions`` (ours, and
    the peers env's when ``peers_python`` is given): the head of every
    results file. Standard library only (no ``kits_keras``), so it works on
    a GPU host without nibabel or TensorFlow."""
    record = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "machine": machine_info(),
        "versions": {"ours": package_versions()},
    }
    if peers_python:
        record["versions"]["peers"] = package_versions(
            ("numpy", "scipy", "torch", "monai", "nnunetv2", "scikit-image",
             "connected-components-3d", "batchgenerators"), peers_python)
    return record


def write_json(path, data):
    """:func:`kits_keras.files.write_json`, imported when called (the peers
    env has no ``kits_keras``). ``kits_keras.files`` needs only the
    standard library, so this works on the GPU host (no nibabel) too."""
    from kits_keras.files import write_json as write

    return write(path, data)


def write_results(name, payload, peers_python=None):
    """Writes ``benchmarks/results/<name>.json`` atomically.

    Adds :func:`result_header` (``benchmark``, ``date``, ``machine``,
    ``versions``) to ``payload``, which should hold the raw figures and a
    ``summary`` dict.

    Returns:
        str. The path written.
    """
    record = result_header(name, peers_python)
    record.update(payload)
    return write_json(os.path.join(RESULTS_DIR, f"{name}.json"), record)
