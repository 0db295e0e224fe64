"""Choosing the Keras backend per host, and importing TensorFlow safely.

Keras 3 runs one model on JAX or TensorFlow. JAX is the backend wherever there
is an accelerator. On CPU-only hosts TensorFlow's oneDNN 3-D convolutions are
several times faster than XLA:CPU's (see ``benchmarks/train_step.py``), so
``auto`` picks TensorFlow there when it is installed.

TensorFlow itself turns its oneDNN kernels on by default only on CPUs with
AVX512_VNNI, AVX512_BF16 or AMX. Elsewhere (an AVX2-only EPYC or Xeon) its
``Conv3D`` runs as Eigen im2col + many small GEMMs: the ``tiny`` training
step takes ~5x longer and the paper-size step ~3x longer than with oneDNN
on an AVX2-only EPYC (``benchmarks/results/train_step.json``, both CPU
kinds in one run). So ``auto`` also turns oneDNN on (``TF_ENABLE_ONEDNN_OPTS=1``) on every
x86 CPU with AVX2, unless the user set that variable.

All of the package's backend state lives in the environment, and this
module alone reads and writes it (environment variables, because Keras
reads ``KERAS_BACKEND`` once, at its first import, and child processes must
inherit the state):

* ``KERAS_BACKEND``: Keras's own; the backend of this process.
* ``KITS_KERAS_DEFAULT_BACKEND``: the value this package last wrote to
  ``KERAS_BACKEND`` as a default, not a user's choice. A ``KERAS_BACKEND``
  that differs from it (or is set without it) is the user's choice and wins
  over ``auto``; one equal to it is not, so a child process of a script
  that imported this package still resolves ``auto`` for its own host.
"""

import ctypes
import importlib.util
import logging
import os
import sys

log = logging.getLogger(__name__)

BACKENDS = ("auto", "jax", "tensorflow")
_KERAS = "KERAS_BACKEND"
_DEFAULT = "KITS_KERAS_DEFAULT_BACKEND"
_ONEDNN = "TF_ENABLE_ONEDNN_OPTS"
_ONEDNN_DEFAULT = "KITS_KERAS_DEFAULT_ONEDNN"
# CPU features with which TensorFlow enables oneDNN by itself
# (tensorflow/core/util/util.cc, IsMKLEnabled / the x86 "NN-focused" check).
TF_ONEDNN_DEFAULT_FLAGS = ("avx512_vnni", "avx512_bf16", "avx_vnni",
                           "amx_tile", "amx_bf16", "amx_int8")
# What ``auto`` records about the CPU (the flags that change our speed).
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16",
                  "amx_tile")


def set_import_defaults():
    """What ``import kits_keras`` does: JAX for Keras unless a backend is
    chosen already, and TensorFlow's C++ start-up chatter kept out of the
    user's terminal (TensorFlow is only a host-side tool here)."""
    if not os.environ.get(_KERAS):
        os.environ[_KERAS] = os.environ[_DEFAULT] = "jax"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def user_choice():
    """The user's ``KERAS_BACKEND``, or None when unset or set by this
    package as a default."""
    chosen = os.environ.get(_KERAS)
    if chosen and chosen != os.environ.get(_DEFAULT):
        return chosen
    return None


def hide_accelerators():
    """Makes JAX and TensorFlow run on the CPU (``infer --device cpu``).

    Must run before JAX is first used.
    """
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"


def import_tensorflow():
    """Imports TensorFlow with every GPU hidden from it and returns the module.

    TensorFlow only feeds data and exports models here; if it claimed a GPU it
    would reserve most of its memory and starve JAX.
    """
    set_import_defaults()
    configure_tensorflow()
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        # Already initialised with GPUs hidden (or by the user): nothing to do.
        pass
    return tf


def has_accelerator():
    """True when JAX sees a GPU or TPU.

    Without a GPU or TPU device node (:func:`cpu_only_host`) the answer is
    False without importing JAX, which takes ~1.5 s on 2 cores: every
    ``kits-keras`` command that resolves ``--backend auto`` asks.
    """
    if importlib.util.find_spec("jax") is None or cpu_only_host():
        return False
    import jax

    return any(d.platform != "cpu" for d in jax.devices())


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The CPU's feature flags (lower case) from ``cpuinfo``; empty where
    it cannot be read (not Linux).

    >>> "avx2" in cpu_flags("/nonexistent") or cpu_flags("/nonexistent")
    frozenset()
    """
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_kind(flags=None, environ=None):
    """``"avx512"``, ``"avx2"`` or ``"other"``: the kind of x86 CPU the
    kernels will see, counting a ``ONEDNN_MAX_CPU_ISA`` cap below AVX-512
    (how the benchmarks emulate an AVX2-only host on an AVX-512 one).

    >>> cpu_kind({"avx2", "avx512f"}, {})
    'avx512'
    >>> cpu_kind({"avx2", "avx512f"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"})
    'avx2'
    """
    flags = cpu_flags() if flags is None else frozenset(flags)
    environ = os.environ if environ is None else environ
    cap = (environ.get("ONEDNN_MAX_CPU_ISA") or "").upper()
    if "avx512f" in flags and (not cap or cap.startswith("AVX512")
                               or cap in ("ALL", "AMX")):
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "other"


def _falsy(value):
    return str(value).strip().lower() in ("0", "false", "off", "no")


def tensorflow_onednn(flags=None, environ=None):
    """``(enabled, source, why)``: whether TensorFlow should run its oneDNN
    kernels on this CPU.

    Args:
        flags: the CPU's feature flags; default :func:`cpu_flags`.
        environ: the environment; default ``os.environ``.

    Returns:
        ``enabled`` (bool), ``source`` (``"user"``: ``TF_ENABLE_ONEDNN_OPTS``
        set by the user; ``"auto"``: this package's choice;
        ``"tensorflow-default"``: left to TensorFlow) and a sentence.

    >>> tensorflow_onednn({"avx2", "fma"}, {})[:2]
    (True, 'auto')
    >>> tensorflow_onednn({"avx2"}, {"TF_ENABLE_ONEDNN_OPTS": "0"})[:2]
    (False, 'user')
    """
    flags = cpu_flags() if flags is None else frozenset(flags)
    environ = os.environ if environ is None else environ
    value = environ.get(_ONEDNN)
    tf_default = bool(flags & set(TF_ONEDNN_DEFAULT_FLAGS))
    if value is not None and value != environ.get(_ONEDNN_DEFAULT):
        return (not _falsy(value), "user",
                f"{_ONEDNN}={value} set by the user")
    if "avx2" not in flags:
        return (tf_default, "tensorflow-default",
                "no AVX2 reported by the CPU: TensorFlow's own default")
    own = ("on" if tf_default else "off (no AVX512_VNNI, AVX512_BF16 or "
           "AMX)")
    return (True, "auto",
            "x86 CPU with AVX2: oneDNN's 3-D convolutions measured faster "
            "than TensorFlow's Eigen ones on AVX-512 and AVX2-only CPUs "
            "(benchmarks/results/train_step.json); TensorFlow's own default "
            f"here would be {own}")


# glibc malloc settings for TensorFlow on CPU: one arena, trimmed on free.
# TensorFlow's CPU allocator is malloc; with glibc's default of up to 8
# arenas per core, the freed activations of one step stay spread over the
# arenas of the threads that freed them, and peak RSS of the paper-size
# step grew from 3.4 to 3.9 GB with no gain in speed
# (benchmarks/results/train_step.json has the figures with these settings).
MALLOC_SETTINGS = {"MALLOC_ARENA_MAX": 1, "MALLOC_TRIM_THRESHOLD_": 0}
_MALLOPT = {"MALLOC_ARENA_MAX": -8, "MALLOC_TRIM_THRESHOLD_": -1}


def tune_allocator(environ=None):
    """Applies :data:`MALLOC_SETTINGS` to this process (``mallopt``) and,
    through the environment, to its children; a setting the user made in
    the environment is left alone. Returns the settings applied (empty
    off glibc)."""
    environ = os.environ if environ is None else environ
    if not sys.platform.startswith("linux"):
        return {}
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return {}
    applied = {}
    # Must run before other threads allocate (NumPy's BLAS starts some at
    # import): on a paper-size step, peak RSS 3.5 GB when set first, 3.9 GB
    # when set after NumPy and Keras were imported.
    for name, value in MALLOC_SETTINGS.items():
        if name in environ:
            continue
        if libc.mallopt(_MALLOPT[name], value) == 1:
            environ[name] = str(value)
            applied[name] = value
    return applied


def cpu_only_host():
    """True when no GPU or TPU device node exists (cheap: imports nothing,
    unlike :func:`has_accelerator`)."""
    dev = "/dev"
    try:
        names = os.listdir(dev)
    except OSError:
        return True
    # vfio: newer TPU VMs (v5e and later) expose their chips through it.
    return not any(n.startswith(("nvidia", "accel", "kfd", "dri", "vfio"))
                   and n != "nvidia-modeset" for n in names)


def configure_tensorflow(environ=None, flags=None):
    """Applies :func:`tensorflow_onednn` to ``environ`` before TensorFlow
    is imported (it reads the variable once), and :func:`tune_allocator`.
    Returns ``enabled``."""
    environ = os.environ if environ is None else environ
    enabled, source, _ = tensorflow_onednn(flags, environ)
    if "tensorflow" not in sys.modules:
        if source == "auto":
            environ[_ONEDNN] = environ[_ONEDNN_DEFAULT] = (
                "1" if enabled else "0")
        if environ is os.environ:
            tune_allocator(environ)
    return enabled


def _onednn_in_force():
    """Whether the TensorFlow of this process runs oneDNN kernels (None if
    TensorFlow is not imported)."""
    if "tensorflow" not in sys.modules or sys.modules["tensorflow"] is None:
        return None
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


def describe(backend=None, flags=None, environ=None):
    """What runs the network in this process, and why: a JSON-ready dict
    for the run folder (``runtime.json``) and the inference JSON.

    Keys: ``backend``, ``why``, ``cpu`` (model, usable cores, the flags in
    :data:`REPORTED_FLAGS`, ``ONEDNN_MAX_CPU_ISA``), ``threads``
    (``OMP_NUM_THREADS`` and the like as set) and, for TensorFlow,
    ``tensorflow_onednn`` (``enabled``, ``source``, ``why``, and
    ``in_force`` as TensorFlow reports it once imported).
    """
    environ = os.environ if environ is None else environ
    flags = cpu_flags() if flags is None else frozenset(flags)
    if backend is None:
        backend = (sys.modules["keras"].backend.backend()
                   if "keras" in sys.modules else resolve_backend("auto"))
    if user_choice() == backend:
        why = f"KERAS_BACKEND={backend} set by the user"
    elif backend == "jax" and has_accelerator():
        why = "accelerator present: JAX/XLA"
    elif backend == "tensorflow":
        why = ("CPU-only host with TensorFlow installed: its oneDNN 3-D "
               "convolutions measured 5-8x faster than XLA:CPU's "
               "(benchmarks/results/train_step.json)")
    else:
        why = "chosen explicitly, or a CPU-only host without TensorFlow"
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    out = {
        "backend": backend,
        "why": why,
        "cpu": {
            "model": model,
            "usable_cores": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "flags": {f: f in flags for f in REPORTED_FLAGS},
            "kind": cpu_kind(flags, environ),
            "onednn_max_cpu_isa": environ.get("ONEDNN_MAX_CPU_ISA"),
        },
        "threads": {k: environ.get(k) for k in (
            "OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
            "TF_NUM_INTEROP_THREADS") if environ.get(k)},
        "malloc": {k: environ.get(k) for k in MALLOC_SETTINGS
                   if environ.get(k) is not None},
    }
    if backend == "tensorflow":
        enabled, source, reason = tensorflow_onednn(flags, environ)
        out["tensorflow_onednn"] = {"enabled": enabled, "source": source,
                                    "why": reason,
                                    "in_force": _onednn_in_force()}
    return out


def resolve_backend(name="auto"):
    """Returns the concrete backend name for ``name`` on this host.

    Args:
        name: str. ``"auto"``, ``"jax"`` or ``"tensorflow"``. ``"auto"`` gives
            ``KERAS_BACKEND`` when the user set it, JAX on hosts with an
            accelerator, TensorFlow on CPU-only hosts where it is installed,
            and JAX otherwise.
    """
    if name not in BACKENDS:
        raise ValueError(
            f"Unknown backend. Expected one of {BACKENDS}. Received: "
            f"backend={name!r}"
        )
    if name != "auto":
        return name
    chosen = user_choice()
    if chosen:
        return chosen
    if has_accelerator():
        return "jax"
    if importlib.util.find_spec("tensorflow") is not None:
        return "tensorflow"
    return "jax"


def select_backend(name="auto"):
    """Sets ``KERAS_BACKEND`` for ``name`` before Keras is imported, and
    for TensorFlow its oneDNN switch (:func:`configure_tensorflow`).

    Returns the backend in force. If Keras was already imported with another
    backend, that backend stays and a warning says so.
    """
    backend = resolve_backend(name)
    if backend == "tensorflow":
        configure_tensorflow()
    if "keras" in sys.modules:
        import keras

        current = keras.backend.backend()
        if current != backend:
            log.warning(
                "Keras is already running on %s; cannot switch to %s in this "
                "process.",
                current,
                backend,
            )
        return current
    user = user_choice()
    os.environ[_KERAS] = backend
    if not user:
        # Child processes resolve "auto" again instead of taking this as
        # the user's choice.
        os.environ[_DEFAULT] = backend
    return backend
