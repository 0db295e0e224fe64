"""One CT stored in any of the 48 axis orientations gets one segmentation.

A synthetic CT (cropped to a few network tiles) is written in every
orientation a NIfTI can have: the 6 axis orders times 8 combinations of
flips, from KiTS19's own IPL to RAS, LPS, LAS, RPI and every single-axis
flip. Each copy is segmented with ``--tta none`` by a tiny untrained but
deterministic U-Net, and each segmentation, written on its own file's grid,
is brought back to the original grid with nibabel: all must be
bit-identical. Before reading flipped as well as transposed (``io`` only
permuted axes), a flipped copy reached the network mirrored and the result
differed.
"""

import hashlib
import itertools
import json
import os
import zipfile

import nibabel as nib
import numpy as np
import pytest
from tests.conftest import save_untrained_tiny_run
from click.testing import CliRunner
from nibabel import orientations as ornts

from kits_keras import io

FLIPS = list(itertools.product((1, -1), repeat=3))
ORDERS = list(itertools.permutations(range(3)))
CLI_CODES = ("RAS", "LPS", "LAS", "RPI")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A run with an untrained tiny U-Net (weights seeded: deterministic)."""
    return save_untrained_tiny_run(
        tmp_path_factory.mktemp("runs") / "20260101-000000-tiny")


@pytest.fixture(scope="module")
def reference(synthetic_cases_dir, tmp_path_factory):
    """A small CT in KiTS19's layout (IPL), an asymmetric crop."""
    ct = io.read_image(os.path.join(synthetic_cases_dir, "case_00000",
                                    io.IMAGE_FILE))
    assert nib.aff2axcodes(ct.affine) == io.KITS19_ORIENTATION
    affine = ct.affine.copy()
    affine[:3, 3] = (12.5, -40.0, 310.0)  # any origin
    path = str(tmp_path_factory.mktemp("ref") / "ref.nii.gz")
    io.save_nifti(path, ct.array[2:22, 20:100, 30:98], affine)
    return path


def reoriented_copy(src, folder, order, flips):
    """Writes ``src`` with its voxel axes permuted and flipped (the same
    world grid); returns the path."""
    img = nib.load(src)
    ornt = np.array([[order[i], flips[i]] for i in range(3)])
    data = ornts.apply_orientation(np.asarray(img.dataobj), ornt)
    affine = img.affine @ ornts.inv_ornt_aff(ornt, img.shape)
    codes = "".join(nib.aff2axcodes(affine))
    path = os.path.join(folder, f"{codes}.nii.gz")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), path)
    return path


def copy_in(src, folder, codes):
    """Writes ``src`` in the orientation given by axis ``codes``."""
    start = ornts.io_orientation(nib.load(src).affine)
    ornt = ornts.ornt_transform(start, ornts.axcodes2ornt(tuple(codes)))
    return reoriented_copy(src, folder, [int(a) for a in ornt[:, 0]],
                           [int(f) for f in ornt[:, 1]])


def on_grid_of(seg_path, ref_path):
    """The segmentation in ``seg_path`` on the voxel grid of ``ref_path``
    (nibabel only: reoriented by the two files' affines)."""
    seg, ref = nib.load(seg_path), nib.load(ref_path)
    ornt = ornts.ornt_transform(ornts.io_orientation(seg.affine),
                                ornts.io_orientation(ref.affine))
    data = ornts.apply_orientation(np.asarray(seg.dataobj), ornt)
    affine = seg.affine @ ornts.inv_ornt_aff(ornt, seg.shape)
    np.testing.assert_allclose(affine, ref.affine, atol=1e-4)
    return data


class Remembered:
    """The network with its answers remembered by input bytes.

    The same batch gets the very answer it got before (the untrained network
    is deterministic anyway), in milliseconds instead of seconds on a CPU;
    a batch it has not seen, such as a mirrored one, is computed. The number
    of distinct batches tells how many different inputs the network saw.
    """

    def __init__(self, network):
        self.network, self.seen = network, {}

    def __call__(self, batch):
        batch = np.ascontiguousarray(batch)
        key = (batch.shape, hashlib.sha256(batch.tobytes()).hexdigest())
        if key not in self.seen:
            self.seen[key] = self.network(batch)
        return self.seen[key].copy()


def segment(path, art, config, out, network=None):
    """``kits-keras infer --tta none --no-postprocess`` through the API."""
    from kits_keras.inference import batch
    from kits_keras.inference import jobs

    job = jobs.Job(io.nifti_stem(path), path, out)
    batch.infer_case(job, network or art.network, config, art.stats,
                     jobs.InferOptions(postprocess=False),
                     orientation=art.orientation)
    return out


@pytest.fixture(scope="module")
def loaded(model_dir):
    from kits_keras.artifact import load_artifact
    from kits_keras.config import override

    art = load_artifact(model_dir)
    return art, override(art.config, infer={"tta": "none"})


def test_artifact_stores_the_training_orientation(model_dir, tmp_path):
    from kits_keras import artifact

    path = os.path.join(model_dir, "model.keras")
    assert artifact.read_metadata(path)["orientation"] == "IPL"
    assert artifact.orientation_of({}) == io.KITS19_ORIENTATION  # older
    assert artifact.orientation_of({"orientation": "RAS"}) == ("R", "A",
                                                               "S")
    with pytest.raises(io.CaseError, match="orientation"):
        artifact.orientation_of({"orientation": "RRS"}, path)


def test_all_48_orientations_same_segmentation(reference, loaded,
                                               tmp_path):
    art, config = loaded
    assert art.orientation == io.KITS19_ORIENTATION
    network = Remembered(art.network)
    want = on_grid_of(segment(reference, art, config,
                              str(tmp_path / "ref_seg.nii.gz"), network),
                      reference)
    batches = len(network.seen)
    # Not a trivial answer: several labels, and mirroring along any axis
    # changes it (a flipped input would show).
    assert len(np.unique(want)) >= 2
    for axis in range(3):
        assert not np.array_equal(want, np.flip(want, axis))
    seen = set()
    for order, flips in itertools.product(ORDERS, FLIPS):
        src = reoriented_copy(reference, str(tmp_path), order, flips)
        seen.add(os.path.basename(src))
        seg = segment(src, art, config, src.replace(".nii.gz", "_seg.nii"),
                      network)
        img, seg_img = nib.load(src), nib.load(seg)
        # On the input's own grid: same shape, same affine, stored uint8.
        assert seg_img.shape == img.shape
        np.testing.assert_allclose(seg_img.affine, img.affine, atol=1e-5)
        assert seg_img.get_data_dtype() == np.uint8
        got = on_grid_of(seg, reference)
        assert np.array_equal(got, want), os.path.basename(src)
    assert len(seen) == 48
    # Every copy showed the network the very batches of the original.
    assert len(network.seen) == batches
    assert {"RAS.nii.gz", "LPS.nii.gz", "LAS.nii.gz", "RPI.nii.gz",
            "SPL.nii.gz", "IAL.nii.gz", "IPR.nii.gz"} <= seen


@pytest.mark.large  # CLI processes; all 48 orientations in-process above
def test_cli_infer_ras_lps_las_rpi(reference, model_dir, loaded, tmp_path):
    from cli.infer import infer

    art, config = loaded
    want = on_grid_of(segment(reference, art, config,
                              str(tmp_path / "want.nii.gz")), reference)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for codes in CLI_CODES:
        copy_in(reference, str(inputs), codes)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        infer, [str(inputs), "-o", str(out), "--model", model_dir,
                "--tta", "none", "--no-postprocess"],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for codes in CLI_CODES:
        seg = str(out / f"{codes}.nii.gz")
        assert nib.aff2axcodes(nib.load(seg).affine) == tuple(codes)
        assert np.array_equal(on_grid_of(seg, reference), want), codes


def test_the_stored_orientation_is_the_one_used(reference, model_dir,
                                                loaded, tmp_path):
    """A model trained on SAR arrays gets SAR arrays (and its answer is
    still written on the file's grid)."""
    from kits_keras.inference import batch
    from kits_keras.inference import predict
    from kits_keras.inference.jobs import InferOptions
    from kits_keras.artifact import METADATA_MEMBER
    from kits_keras.artifact import read_metadata

    art, config = loaded
    src = os.path.join(model_dir, "model.keras")
    sar = tmp_path / "sar_run" / "model.keras"
    sar.parent.mkdir()
    metadata = dict(read_metadata(src), orientation="SAR")
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(sar, "w") as b:
        for item in a.infolist():
            if item.filename != METADATA_MEMBER:
                b.writestr(item, a.read(item.filename))
        b.writestr(METADATA_MEMBER, json.dumps(metadata))
    out = tmp_path / "out"
    summary = batch.run_inference(
        [reference], str(out), model=str(sar.parent),
        infer_overrides={"tta": "none"},
        options=InferOptions(postprocess=False))
    assert not summary["failures"]
    volume = io.read_image(reference, "SAR")
    labels = predict.predict_case(volume, art.network, config,
                                  art.stats).labels
    want = str(tmp_path / "want.nii.gz")
    io.save_like(want, labels, volume)
    got = on_grid_of(str(out / "ref.nii.gz"), reference)
    assert np.array_equal(got, on_grid_of(want, reference))
