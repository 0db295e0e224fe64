"""Backend selection: a user's KERAS_BACKEND is honoured, the package's own
default is not mistaken for one in child processes."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLEAN = {k: v for k, v in os.environ.items()
         if k not in ("KERAS_BACKEND", "KITS_KERAS_DEFAULT_BACKEND")}
RESOLVE = ("import kits_keras; from kits_keras.backend import "
           "resolve_backend; print(resolve_backend())")


def _resolve(env, prelude=""):
    proc = subprocess.run([sys.executable, "-c", prelude + RESOLVE], env=env,
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


# JAX_PLATFORMS=cpu hides any GPU from JAX, so the host counts as CPU-only
# on every machine (one with a GPU included) and the expected backends are
# known in advance instead of recomputed with resolve_backend's own rule.
CPU_ONLY = dict(CLEAN, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
# find_spec("tensorflow") is None once sys.modules holds None for it.
NO_TENSORFLOW = "import sys; sys.modules['tensorflow'] = None; "


def test_auto_on_a_cpu_host_is_tensorflow_unless_the_user_chose():
    assert _resolve(CPU_ONLY) == "tensorflow"
    assert _resolve(dict(CPU_ONLY, KERAS_BACKEND="jax")) == "jax"
    assert _resolve(dict(CPU_ONLY, KERAS_BACKEND="tensorflow")) == (
        "tensorflow")


def test_auto_on_a_cpu_host_without_tensorflow_is_jax():
    assert _resolve(CPU_ONLY, NO_TENSORFLOW) == "jax"


def test_child_of_an_importing_process_still_resolves_auto():
    # The parent imports kits_keras, which sets KERAS_BACKEND=jax for
    # Keras; a child (kits-keras infer from a script) must not take that
    # default for a user's choice and run on the slower backend.
    code = ("import os, subprocess, sys; import kits_keras; "
            f"print(subprocess.run([sys.executable, '-c', {RESOLVE!r}], "
            "capture_output=True, text=True).stdout)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, cwd=REPO, env=CPU_ONLY)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "tensorflow"


def test_unknown_backend_is_a_clear_error():
    from kits_keras.backend import resolve_backend

    with pytest.raises(ValueError, match="Received: backend='torch'"):
        resolve_backend("torch")


def test_auto_on_a_host_without_device_nodes_does_not_import_jax():
    # Importing JAX to ask for devices costs ~1.5 s of every CLI start.
    from kits_keras.backend import cpu_only_host

    if not cpu_only_host():
        pytest.skip("this host has GPU/TPU device nodes")
    code = "import sys; " + RESOLVE + "; print('jax' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], env=dict(
        CLEAN, PYTHONPATH=REPO), capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["tensorflow", "False"]
