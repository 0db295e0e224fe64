"""A SavedModel is code: crafted exports are refused before they run.

Each crafted export is a real ``tf.saved_model.save`` of a ``tf.Module``
whose ``serving_default`` does something besides computing, with a valid
``assets/kits_keras.json``, so that without the graph check
``kits-keras infer --saved-model`` loads and runs it (and exits 0).
"""

import numpy as np
import pytest
from tests.cli_harness import run_cli
from tests.cli_harness import snapshot

from kits_keras import io

SPEC_SHAPE = [None, None, None, None, 1]


def _tf():
    from kits_keras.backend import import_tensorflow

    return import_tensorflow()


def _craft(folder, body):
    """Saves a module whose serving_default runs ``body(tf)`` first, then
    returns constant probabilities; adds a valid kits-keras asset."""
    from kits_keras.inference import export
    from kits_keras.config import get_config
    from kits_keras.data.intensity import IntensityStats

    tf = _tf()

    class Crafted(tf.Module):
        def __init__(self):
            super().__init__()
            self.scale = tf.Variable(1.0)  # a saver graph, as in exports

        @tf.function(input_signature=[
            tf.TensorSpec(SPEC_SHAPE, tf.float32, name="image")])
        def serve(self, image):
            body(tf)
            zeros = tf.zeros_like(image)
            return {"probabilities": tf.concat(
                [tf.ones_like(image) * self.scale, zeros, zeros], axis=-1)}

    module = Crafted()
    tf.saved_model.save(module, folder,
                        signatures={"serving_default": module.serve})
    stats = IntensityStats(clip_low=-100.0, clip_high=300.0, mean=100.0,
                           std=80.0)
    export._write_metadata(folder, export.metadata(get_config("tiny"), stats))
    return folder


@pytest.fixture
def ct_file(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.normal(40, 30, (40, 40, 12)).astype(np.float32)  # x, y, z
    path = str(tmp_path / "ct.nii.gz")
    io.save_nifti(path, array, np.diag([0.8, 0.8, 3.0, 1.0]))
    return path


@pytest.mark.large  # an infer process; the op check is tested in process
def test_crafted_read_and_write_export_refused_by_infer(ct_file, tmp_path):
    """Reads a file and writes it elsewhere: refused, nothing runs."""
    secret = tmp_path / "secret.txt"
    secret.write_text("hostname-like secret\n")
    marker = tmp_path / "written_by_export.txt"
    export = _craft(str(tmp_path / "evil" / "1"), lambda tf: tf.io.write_file(
        str(marker), tf.io.read_file(str(secret))))
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(str(out))
    result = run_cli(["infer", ct_file, "--saved-model", export, "-o",
                      str(out / "seg.nii.gz"), "--tta", "none",
                      "--backend", "tensorflow"])
    assert result.returncode == 1, result.stderr[-2000:]
    assert len(result.error_lines) == 1, result.stderr[-2000:]
    line = result.error_lines[0]
    assert export in line and "trusted source" in line
    assert "op ReadFile" in line or "op WriteFile" in line, line
    assert not marker.exists()
    assert snapshot(str(out)) == before


@pytest.mark.parametrize("op, body", [
    ("ReadFile", lambda tf: tf.io.read_file("/etc/hostname")),
    ("WriteFile", lambda tf: tf.io.write_file("/tmp/kk_never", "x")),
    ("MatchingFiles", lambda tf: tf.io.matching_files("/etc/*")),
    ("PrintV2", lambda tf: tf.print("x", output_stream="file:///tmp/kk_p")),
    ("EagerPyFunc", lambda tf: tf.py_function(lambda: 0.0, [], tf.float32)),
    ("SaveV2", lambda tf: tf.raw_ops.SaveV2(
        prefix="/tmp/kk_ckpt", tensor_names=["a"], shape_and_slices=[""],
        tensors=[tf.constant(1.0)])),
])
def test_each_io_op_is_named(op, body, tmp_path):
    """SaveV2 too: allowed in the saver functions only, not in serving."""
    from kits_keras.inference.saved_model import check_saved_model_ops

    folder = _craft(str(tmp_path / "m"), body)
    with pytest.raises(ValueError, match=rf"op {op} in function "):
        check_saved_model_ops(folder)


def test_plain_module_with_variables_passes(tmp_path):
    """Variables, their saver graph (SaveV2/RestoreV2) and arithmetic are
    what a real export holds; they pass."""
    from kits_keras.inference.saved_model import check_saved_model_ops

    folder = _craft(str(tmp_path / "m"), lambda tf: tf.debugging.assert_equal(
        tf.constant(1), 1))
    check_saved_model_ops(folder)
