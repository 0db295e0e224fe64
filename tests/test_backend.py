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


def _auto():
    from kits_keras.backend import has_accelerator

    return "jax" if has_accelerator() else "tensorflow"


def _resolve(env):
    proc = subprocess.run([sys.executable, "-c", RESOLVE], env=env,
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_auto_picks_per_host_and_user_choice_wins():
    assert _resolve(dict(CLEAN, PYTHONPATH=REPO)) == _auto()
    assert _resolve(dict(CLEAN, PYTHONPATH=REPO, KERAS_BACKEND="jax")) == (
        "jax")


def test_child_of_an_importing_process_still_resolves_auto():
    # The parent imports kits_keras, which sets KERAS_BACKEND=jax for
    # Keras; a child (kits-keras infer from a script) must not take that
    # default for a user's choice and run on the slower backend.
    code = ("import os, subprocess, sys; import kits_keras; "
            f"print(subprocess.run([sys.executable, '-c', {RESOLVE!r}], "
            "capture_output=True, text=True).stdout)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, cwd=REPO,
                          env=dict(CLEAN, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == _auto()


def test_unknown_backend_is_a_clear_error():
    from kits_keras.backend import resolve_backend

    with pytest.raises(ValueError, match="Received: backend='torch'"):
        resolve_backend("torch")
