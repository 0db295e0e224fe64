"""Volumes that would take all memory or have no usable geometry (issue 13,
points 4 and 5), driven through ``infer``, ``postprocess``, ``evaluate``
and ``prepare``.

Every row is a small file: a header declaring a volume far beyond any CT, a
gzip bomb, data shorter than declared, or geometry nibabel would accept (no
voxel size, 10^-6 mm or 10^4 times a CT's voxels, a NaN translation, a
singular affine). Each command must exit 1 with one stderr line naming the
file, create or change nothing in its output location (before/after
snapshot), and stay under 1 GB of resident memory (the real ``kits-keras``
process, ``tests/cli_harness.py``; importing TensorFlow alone is ~0.6 GB).
An ``infer`` batch reports every bad file and still segments the good ones.
"""

import os
import shutil
import struct
import zlib

import nibabel as nib
import numpy as np
import pytest
from tests.conftest import save_untrained_tiny_run
from tests.cli_harness import run_cli
from tests.cli_harness import snapshot

from kits_keras import io

MAX_RSS_MB = 1024
INFER = ["--tta", "none", "--backend", "tensorflow", "--no-postprocess"]
# KiTS19's voxel-to-world matrix for 2.5 x 0.8 x 0.8 mm voxels.
KITS = np.array([[0.0, 0.0, -0.8, 0.0], [0.0, -0.8, 0.0, 0.0],
                 [-2.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def _header(shape, dtype=np.int16, affine=KITS, **fields):
    """NIfTI-1 header bytes (with the 4-byte extension flag) as given,
    nothing fixed up."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    if affine is not None:
        header.set_sform(affine, code="aligned")
        header["pixdim"][1:4] = np.linalg.norm(
            np.nan_to_num(affine)[:3, :3], axis=0)
    for name, value in fields.items():
        header[name] = value
    header["vox_offset"] = 352
    return header.binaryblock + b"\0" * 4


def _gzip(path, data, zeros=0):
    """Writes gzip(data + ``zeros`` zero bytes). The zeros are deflated
    once per 16 MiB and the block repeated (a full flush makes blocks
    independent), so a 1 GiB bomb takes a fraction of a second to make."""
    chunk = bytes(2**24)
    first = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [first.compress(data) + first.flush(zlib.Z_FULL_FLUSH)]
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = block.compress(chunk) + block.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(data)
    for _ in range(zeros // len(chunk)):
        parts.append(block)
        crc = zlib.crc32(chunk, crc)
    parts.append(zlib.compressobj(9, zlib.DEFLATED, -15).flush())
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")
        f.writelines(parts)
        f.write(struct.pack("<II", crc, (len(data) + zeros) % 2**32))
    return str(path)


def _small(shape=(8, 16, 16)):
    return np.zeros(shape, np.int16).tobytes(order="F")


def _affine(spacing=(2.5, 0.8, 0.8), origin=(0.0, 0.0, 0.0)):
    affine = KITS.copy()
    affine[2, 0], affine[1, 1], affine[0, 2] = (-s for s in spacing)
    affine[:3, 3] = origin
    return affine


def _singular():
    affine = np.eye(4)
    affine[:3, :3] = [[0.8, 0.8, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 2.5]]
    return affine


# name -> (write(path), what the one error line says)
BAD = {
    "declares_1024^3_int16": (
        lambda p: _gzip(p, _header((1024, 1024, 1024))),
        "over the limit"),
    "declares_30000^3": (
        lambda p: _gzip(p, _header((30000, 30000, 30000))),
        "each axis must have 1 to 4096"),
    "gzip_bomb_1GiB_of_zeros": (
        lambda p: _gzip(p, _header((1024, 1024, 1024), np.uint8),
                        zeros=2**30),
        "over the limit"),
    "truncated_declares_1GB": (
        lambda p: _gzip(p, _header((1000, 1024, 512))),
        "truncated: holds 0 of the 1,048,576,000 data bytes"),
    "spacing_10^4x": (
        lambda p: _gzip(p, _header((8, 16, 16), affine=_affine(
            (25000.0, 8000.0, 8000.0))) + _small()),
        "outside the plausible"),
    "zero_pixdim_no_qform_sform": (
        lambda p: _gzip(p, _header((8, 16, 16), affine=None,
                                   pixdim=[1, 0, 0, 0, 1, 0, 0, 0],
                                   qform_code=0, sform_code=0) + _small()),
        "no voxel size"),
    "spacing_10^-6_mm": (
        lambda p: _gzip(p, _header((8, 16, 16), affine=_affine(
            (1e-6, 1e-6, 1e-6))) + _small()),
        "outside the plausible"),
    "nan_translation": (
        lambda p: _gzip(p, _header((8, 16, 16), affine=_affine(
            origin=(np.nan, 0.0, 0.0))) + _small()),
        "non-finite affine"),
    "singular_affine": (
        lambda p: _gzip(p, _header((8, 16, 16), affine=_singular())
                        + _small()),
        "singular affine"),
}
NAMES = sorted(BAD)


def _bad_file(folder, name, filename=None):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, filename or f"{name}.nii.gz")
    return BAD[name][0](path)


def _lines_naming(result, path):
    return [line for line in result.error_lines if path in line]


def _refused(result, path, message):
    """Exit 1; the file named, with the problem, in one message."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = _lines_naming(result, path)
    assert lines, result.stderr[-3000:]
    # infer also logs the failure as it happens, then lists it at the end
    # (FAILED ...): the same message.
    assert len({line[line.index(path):] for line in lines}) == 1, lines
    assert message in lines[0], lines[0]
    assert result.peak_rss_mb < MAX_RSS_MB, result.peak_rss_mb


@pytest.fixture(scope="module")
def good_cts(synthetic_cases_dir, tmp_path_factory):
    """Two small synthetic CTs (a few network tiles each)."""
    folder = tmp_path_factory.mktemp("good")
    paths = []
    for case in ("case_00000", "case_00001"):
        ct = io.read_image(os.path.join(synthetic_cases_dir, case,
                                        io.IMAGE_FILE))
        path = str(folder / f"good_{case}.nii.gz")
        io.save_nifti(path, ct.array[:20, 16:96, 16:96], ct.affine)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_untrained_tiny_run(tmp_path_factory.mktemp("runs") / "tiny")


def test_the_table_files_are_small(tmp_path):
    for name in NAMES:
        size = os.path.getsize(_bad_file(str(tmp_path), name))
        assert size < 2**21, (name, size)  # a 1 MB bomb at most


def _one_fast(fast):
    """NAMES as parameters, all but ``fast`` marked large: every file goes
    through the same reader, which the fast infer batch test below sends
    every one of them through."""
    return [name if name == fast else pytest.param(
        name, marks=pytest.mark.large) for name in NAMES]


@pytest.mark.parametrize("name", _one_fast("gzip_bomb_1GiB_of_zeros"))
def test_postprocess_refuses(name, tmp_path):
    bad = _bad_file(str(tmp_path / "in"), name)
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.nii.gz").write_bytes(b"kept")
    before = snapshot(str(out))
    result = run_cli(["postprocess", bad, str(out / "seg.nii.gz")])
    _refused(result, bad, BAD[name][1])
    assert snapshot(str(out)) == before


@pytest.mark.parametrize("name", _one_fast("nan_translation"))
def test_evaluate_refuses(name, synthetic_cases_dir, tmp_path):
    """The bad file as a prediction: that case cannot be scored (exit 1),
    the folders read are untouched, the report says why."""
    truth = tmp_path / "gt"
    for case in ("case_00000", "case_00001"):
        shutil.copytree(os.path.join(synthetic_cases_dir, case),
                        truth / case)
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(truth / "case_00000" / io.LABELS_FILE,
                pred / "case_00000.nii.gz")
    bad = _bad_file(str(pred), name, "case_00001.nii.gz")
    before = (snapshot(str(pred)), snapshot(str(truth)))
    result = run_cli(["evaluate", str(pred), str(truth), "--out",
                      str(tmp_path / "report")])
    _refused(result, bad, BAD[name][1])
    assert (snapshot(str(pred)), snapshot(str(truth))) == before


def _infer_refuses(name, model_dir, tmp_path):
    bad = _bad_file(str(tmp_path / "in"), name)
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(str(out))
    result = run_cli(["infer", bad, "-o", str(out), "--model", model_dir,
                      *INFER])
    _refused(result, bad, BAD[name][1])
    assert snapshot(str(out)) == before


@pytest.mark.large  # the infer batch test below sends this file too
def test_infer_refuses_a_huge_declared_volume(model_dir, tmp_path):
    _infer_refuses("declares_1024^3_int16", model_dir, tmp_path)


@pytest.mark.large
@pytest.mark.parametrize("name", [n for n in NAMES
                                  if n != "declares_1024^3_int16"])
def test_infer_refuses(name, model_dir, tmp_path):
    _infer_refuses(name, model_dir, tmp_path)


@pytest.mark.large  # an infer process segmenting; postprocess and evaluate
# refuse the table fast
def test_infer_batch_reports_every_bad_file_and_segments_the_rest(
        good_cts, model_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = [shutil.copy(p, inputs) for p in good_cts]
    bad = [_bad_file(str(inputs), name) for name in NAMES]
    out = tmp_path / "out"
    result = run_cli(["infer", str(inputs), "-o", str(out), "--model",
                      model_dir, *INFER])
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"{len(bad)} of {len(bad) + len(good)} inputs failed" in (
        result.stderr)
    for path, name in zip(bad, NAMES):
        assert any(BAD[name][1] in line
                   for line in _lines_naming(result, path)), name
    assert result.peak_rss_mb < MAX_RSS_MB
    for path in good:
        seg = nib.load(str(out / os.path.basename(path)))
        assert seg.shape == nib.load(path).shape
    written = {name for name in os.listdir(out) if name.endswith(".nii.gz")}
    assert written == {os.path.basename(p) for p in good}


def _manual_dir(synthetic_cases_dir, tmp_path, name):
    manual = tmp_path / "manual"
    for case in ("case_00000", "case_00001"):
        shutil.copytree(os.path.join(synthetic_cases_dir, case),
                        manual / case)
    os.remove(manual / "case_00001" / io.IMAGE_FILE)
    return _bad_file(str(manual / "case_00001"), name, io.IMAGE_FILE)


def _prepare_refuses(name, synthetic_cases_dir, tmp_path):
    bad = _manual_dir(synthetic_cases_dir, tmp_path, name)
    data = tmp_path / "tfds"
    data.mkdir()
    before = snapshot(str(data))
    result = run_cli(["prepare", "--manual-dir", str(tmp_path / "manual"),
                      "--data-dir", str(data), "--config", "tiny",
                      "--workers", "1"])
    _refused(result, bad, BAD[name][1])
    assert snapshot(str(data)) == before


@pytest.mark.large  # in process: test_prepare's bad-case test
def test_prepare_refuses_a_singular_affine(synthetic_cases_dir, tmp_path):
    _prepare_refuses("singular_affine", synthetic_cases_dir, tmp_path)


@pytest.mark.large
@pytest.mark.parametrize("name", [n for n in NAMES
                                  if n != "singular_affine"])
def test_prepare_refuses(name, synthetic_cases_dir, tmp_path):
    _prepare_refuses(name, synthetic_cases_dir, tmp_path)


def test_gzip_data_past_the_declared_size_is_never_inflated(tmp_path):
    """8 GiB of zeros after a valid 8 x 16 x 16 label volume: read to the
    declared size only (inflating it all takes a minute or more)."""
    src = _gzip(tmp_path / "seg.nii.gz",
                _header((8, 16, 16), np.uint8) + bytes(8 * 16 * 16),
                zeros=2**33)
    assert os.path.getsize(src) < 2**24
    out = str(tmp_path / "out.nii.gz")
    result = run_cli(["postprocess", src, out], timeout=30)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.peak_rss_mb < MAX_RSS_MB
    assert nib.load(out).shape == (8, 16, 16)


def test_infer_batch_goes_on_after_a_memory_error(good_cts, model_dir,
                                                  tmp_path, monkeypatch):
    """Whatever the limits miss: a MemoryError in one case is that case's
    one-line failure, naming its file, and the next case is segmented."""
    from kits_keras.inference import batch
    from kits_keras.inference import predict

    real = predict.predict_case

    def predict_case(volume, *args, **kwargs):
        if volume.path == good_cts[0]:
            raise MemoryError("Unable to allocate 4.46 PiB for an array")
        return real(volume, *args, **kwargs)

    monkeypatch.setattr(predict, "predict_case", predict_case)
    summary = batch.run_inference(
        good_cts, str(tmp_path / "out"), model=model_dir,
        infer_overrides={"tta": "none"})
    [failure] = summary["failures"]
    assert failure["error"] == (f"{good_cts[0]}: out of memory (Unable to "
                                "allocate 4.46 PiB for an array)")
    assert [c["input"] for c in summary["cases"]] == [good_cts[1]]
    assert os.listdir(tmp_path / "out") and not os.path.exists(
        tmp_path / "out" / os.path.basename(good_cts[0]))
