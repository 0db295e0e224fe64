"""``--backend auto`` on both CPU kinds: the oneDNN choice per CPU, checked
against flags of each kind, in a real TensorFlow process with the AVX2-only
emulation, and against the measured benchmark (auto never picks a side
that ``benchmarks/train_step.py`` measured slower)."""

import json
import os
import subprocess
import sys

import pytest

from kits_keras import backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(REPO, "benchmarks", "results", "train_step.json")
# Flags as /proc/cpuinfo prints them on the two kinds of 2-core machine.
AVX512_HOST = {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw",
               "avx512_vnni", "avx512_bf16"}
AVX2_HOST = {"sse4_2", "avx", "avx2", "fma"}


@pytest.mark.parametrize("flags", [AVX512_HOST, AVX2_HOST],
                         ids=["avx512", "avx2"])
def test_auto_turns_onednn_on_for_both_kinds(flags):
    enabled, source, why = backend.tensorflow_onednn(flags, {})
    assert (enabled, source) == (True, "auto")
    # The note says what TensorFlow alone would have done on that CPU.
    assert ("would be on" in why) == ("avx512_vnni" in flags)


def test_a_user_setting_wins_and_old_cpus_keep_tensorflows_default():
    assert backend.tensorflow_onednn(
        AVX2_HOST, {"TF_ENABLE_ONEDNN_OPTS": "0"})[:2] == (False, "user")
    assert backend.tensorflow_onednn(
        AVX512_HOST, {"TF_ENABLE_ONEDNN_OPTS": "false"})[:2] == (False,
                                                                 "user")
    # The package's own earlier choice (inherited by a child) is not a
    # user's: it is made again for this host.
    assert backend.tensorflow_onednn(
        AVX2_HOST, {"TF_ENABLE_ONEDNN_OPTS": "1",
                    "KITS_KERAS_DEFAULT_ONEDNN": "1"})[1] == "auto"
    assert backend.tensorflow_onednn({"sse4_2"}, {})[:2] == (
        False, "tensorflow-default")


def test_cpu_kind_counts_the_onednn_isa_cap():
    assert backend.cpu_kind(AVX512_HOST, {}) == "avx512"
    assert backend.cpu_kind(AVX512_HOST,
                            {"ONEDNN_MAX_CPU_ISA": "AVX2"}) == "avx2"
    assert backend.cpu_kind(AVX2_HOST, {}) == "avx2"
    assert backend.cpu_kind({"sse4_2"}, {}) == "other"


PROBE = """
import json, os
from kits_keras.backend import select_backend, describe
select_backend("auto")
import keras
from tensorflow.python.util import _pywrap_util_port
d = describe()
print(json.dumps({"in_force": bool(_pywrap_util_port.IsMklEnabled()),
                  "described": d,
                  "env": os.environ.get("TF_ENABLE_ONEDNN_OPTS")}))
"""


def _probe(extra_env):
    env = {k: v for k, v in os.environ.items() if k not in (
        "KERAS_BACKEND", "KITS_KERAS_DEFAULT_BACKEND",
        "TF_ENABLE_ONEDNN_OPTS", "KITS_KERAS_DEFAULT_ONEDNN")}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **extra_env)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.large  # a TensorFlow process; the flag logic is tested above
@pytest.mark.skipif("avx2" not in backend.cpu_flags(),
                    reason="needs an x86 CPU with AVX2")
def test_tensorflow_runs_onednn_on_the_avx2_emulation_and_says_why():
    # ONEDNN_MAX_CPU_ISA=AVX2: oneDNN limited to AVX2, as on an AVX2-only
    # EPYC; TensorFlow alone would run its Eigen kernels there.
    out = _probe({"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert out["in_force"] is True and out["env"] == "1"
    d = out["described"]
    assert d["backend"] == "tensorflow"
    assert d["cpu"]["kind"] == "avx2"
    assert d["cpu"]["onednn_max_cpu_isa"] == "AVX2"
    assert d["tensorflow_onednn"]["in_force"] is True
    assert d["tensorflow_onednn"]["source"] == "auto"
    # The user's "off" (TensorFlow's AVX2 default) is honoured and recorded.
    out = _probe({"ONEDNN_MAX_CPU_ISA": "AVX2", "TF_ENABLE_ONEDNN_OPTS": "0"})
    assert out["in_force"] is False
    assert out["described"]["tensorflow_onednn"]["source"] == "user"


def _measured():
    """``{(file, kind): entry}`` of every committed two-kind run
    (``train_step.json`` and the ``train_step_<host>_host.json`` kept from
    other kinds of CPU)."""
    import glob

    kinds = {}
    for path in [RESULT] + sorted(glob.glob(RESULT.replace(
            ".json", "_*_host.json"))):
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            for kind, entry in data.get("kinds", {}).items():
                kinds[(os.path.basename(path), kind)] = entry
    if not kinds:
        pytest.skip("no two-kind benchmarks/results/train_step*.json")
    return kinds


def test_auto_never_picks_a_measured_slower_tensorflow_setting():
    """For each CPU kind of the committed benchmark, the oneDNN setting
    auto chooses today (for that kind's flags) trains and predicts no
    slower than the other, on the paper-size and the tiny step."""
    from benchmarks.train_step import kind_flags

    for (_, kind), entry in _measured().items():
        flags = {f for f, present in entry["flags_seen"].items() if present}
        enabled = backend.tensorflow_onednn(kind_flags(kind, flags), {})[0]
        chosen, other = (("tensorflow-onednn", "tensorflow-eigen") if enabled
                         else ("tensorflow-eigen", "tensorflow-onednn"))
        for model, sides in entry["sides"].items():
            if "train" not in sides.get(other, {}):
                continue
            for what in ("train", "forward"):
                ours = sides[chosen][what]["median"]
                theirs = sides[other][what]["median"]
                # 10 %: the noise between two runs of one side.
                assert ours <= 1.1 * theirs, (kind, model, what, ours,
                                              theirs)
