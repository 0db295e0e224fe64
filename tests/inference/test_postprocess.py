"""Connected-component clean-up: constructed cases and real KiTS19 and
KiTS23 labels."""

import os

import nibabel as nib
import numpy as np
import pytest

from kits_keras.inference import postprocess as pp

LABELS_DIR = os.environ.get(
    "KITS19_LABELS",
    os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared",
                 "data", "kits19-labels"),
)
KITS23_DIR = os.path.join(os.path.dirname(LABELS_DIR), "kits23-labels")
KITS23_CASES = ("case_00400", "case_00403", "case_00409", "case_00418",
                "case_00430", "case_00433", "case_00442", "case_00451")
REAL_CASES = ("case_00002", "case_00003", "case_00004", "case_00005",
              "case_00010", "case_00021", "case_00030", "case_00040")


def two_kidneys():
    seg = np.zeros((40, 60, 80), dtype=np.uint8)
    seg[5:25, 10:30, 5:25] = 1      # left kidney, 8000 voxels
    seg[5:25, 10:30, 50:68] = 1     # right kidney, 7200 voxels
    seg[10:16, 14:20, 20:28] = 2    # tumour bulging out of the left kidney
    return seg


def test_keeps_two_kidneys_and_attached_tumour_unchanged():
    seg = two_kidneys()
    before = seg.copy()
    out = pp.postprocess(seg)
    assert np.array_equal(out, seg)
    assert np.array_equal(seg, before)  # input untouched
    assert out is not seg


def test_third_kidney_sized_blob_removed():
    seg = two_kidneys()
    seg[30:38, 40:58, 30:45] = 1    # 2160 voxels, far from both kidneys
    out = pp.postprocess(seg)
    assert np.array_equal(out, two_kidneys())


def test_of_three_kidney_sized_components_the_most_kidney_is_kept():
    # Both kidneys found, and a larger organ called tumour with a little
    # kidney (as on case_00442's phantom): by size alone the right kidney
    # would go.
    seg = two_kidneys()
    organ = (slice(28, 40), slice(35, 60), slice(2, 40))   # 11,400 voxels
    seg[organ] = 2
    seg[28:30, 35:60, 2:10] = 1                            # 400 of kidney
    out = pp.postprocess(seg)
    assert np.array_equal(out, two_kidneys())
    # Not kidney-sized (below 0.3 of the largest kidney-bearing
    # component), the third is simply the smallest, as before.
    small = two_kidneys()
    small[30:38, 40:58, 30:45] = 1
    small[5:25, 10:30, 50:68] = 0
    small[5:10, 10:20, 50:60] = 1                          # 500 voxels
    out = pp.postprocess(small)
    assert out[30:38, 40:58, 30:45].all()
    assert out[5:10, 10:20, 50:60].max() == 0


def test_a_kidney_that_is_mostly_tumour_is_kept_beside_a_healthy_one():
    # KiTS19 case_00030's pattern: 1.5 L component, 3 % of it kidney.
    seg = np.zeros((40, 60, 100), dtype=np.uint8)
    seg[2:38, 2:40, 2:50] = 2                    # 65,664 voxels of tumour
    seg[2:38, 2:6, 2:17] = 1                     # 2,160 of them kidney
    seg[10:25, 10:30, 70:90] = 1                 # healthy kidney, 6,000
    seg[30:33, 50:53, 80:83] = 1                 # a fragment: removed
    out = pp.postprocess(seg, voxel_ml=0.02)
    expected = seg.copy()
    expected[30:33, 50:53, 80:83] = 0
    assert np.array_equal(out, expected)


def test_detached_tumour_removed_touching_tumour_kept():
    seg = two_kidneys()
    seg[30:36, 45:55, 70:78] = 2    # tumour touching no kidney
    seg[25:28, 28:31, 60:63] = 2    # tumour touching the right kidney
    out = pp.postprocess(seg)
    assert out[30:36, 45:55, 70:78].max() == 0
    expected = two_kidneys()
    expected[25:28, 28:31, 60:63] = 2
    assert np.array_equal(out, expected)


def test_diagonal_contact_counts_as_connected():
    seg = np.zeros((10, 10, 10), dtype=np.uint8)
    seg[2:5, 2:5, 2:5] = 1
    seg[5, 5, 5] = 2                # corner contact: 26-connected
    assert pp.postprocess(seg)[5, 5, 5] == 2


def test_single_kidney_and_small_fragments():
    seg = np.zeros((30, 40, 40), dtype=np.uint8)
    seg[2:22, 2:22, 2:22] = 1       # one kidney (8000)
    seg[25:28, 30:33, 30:33] = 1    # 27 voxels: below 5 % of the largest
    out = pp.postprocess(seg)
    assert out[25:28, 30:33, 30:33].max() == 0
    assert np.array_equal(out[:22], seg[:22])


def test_empty_and_tumour_only():
    assert pp.postprocess(np.zeros((4, 5, 6), np.uint8)).max() == 0
    # Only tumour predicted: cleared, unless kidney-sized (>= 100 mL).
    seg = np.zeros((8, 8, 8), np.uint8)
    seg[2:4, 2:4, 2:4] = 2          # 8 voxels
    assert pp.postprocess(seg).max() == 0
    assert pp.postprocess(seg, voxel_ml=10.0).max() == 0     # 80 mL
    assert np.array_equal(pp.postprocess(seg, voxel_ml=13.0), seg)


def test_kidney_sized_tumour_only_component_kept_small_one_removed():
    seg = two_kidneys()
    seg[5:25, 10:30, 50:68] = 2     # the right kidney predicted all tumour
    seg[30:33, 45:50, 70:75] = 2    # a small detached tumour (75 voxels)
    out = pp.postprocess(seg, voxel_ml=0.04)   # 7200 voxels = 288 mL
    assert (out[5:25, 10:30, 50:68] == 2).all()
    assert out[30:33, 45:50, 70:75].max() == 0
    assert np.array_equal(out[:, :, :40], two_kidneys()[:, :, :40])
    # Below 100 mL it is not kidney-sized: removed.
    assert pp.postprocess(seg, voxel_ml=0.01)[5:25, 10:30, 50:68].max() == 0


def test_cysts_must_touch_a_kidney_like_tumours():
    seg = two_kidneys()
    seg[8:12, 22:28, 8:14] = 3      # cyst inside the left kidney's edge
    seg[25:29, 12:18, 60:66] = 3    # cyst bulging below the right kidney
    seg[10:16, 14:20, 28:31] = 3    # cyst on the tumour, not the kidney
    seg[30:36, 45:55, 70:78] = 3    # cyst touching nothing
    seg[32:36, 40:44, 2:6] = 2      # tumour touching nothing
    expected = seg.copy()
    expected[30:36, 45:55, 70:78] = 0
    expected[32:36, 40:44, 2:6] = 0
    assert np.array_equal(pp.postprocess(seg), expected)


def test_kidney_sized_cyst_only_component_kept_like_tumour_only():
    seg = two_kidneys()
    seg[5:25, 10:30, 50:68] = 3     # the right kidney predicted all cyst
    out = pp.postprocess(seg, voxel_ml=0.04)   # 288 mL: kidney-sized
    assert np.array_equal(out, seg)
    assert pp.postprocess(seg, voxel_ml=0.01)[5:25, 10:30, 50:68].max() == 0


def add_false_positives(seg, cyst=False):
    """Adds blobs far from the foreground: kidney fragments, a third
    kidney-sized blob smaller than the smallest true kidney component, a
    detached tumour and, with ``cyst``, a detached cyst. Returns the new
    array."""
    # The components clean-up keeps (all of them in KiTS19's ground truth;
    # KiTS23's has specks of a few voxels besides).
    sizes = pp.component_table(pp.postprocess(seg))[2][1:]
    # A third blob is only recognisable as such next to two kidneys; next
    # to one kidney it must be small (below min_fraction) to be removable.
    blob = 0.6 * sizes.min() if len(sizes) >= 2 else 0.03 * sizes.max()
    out = seg.copy()
    z, y, x = seg.shape
    depth = max(2, min(z // 4, 30))
    z0 = z // 2 - depth // 2
    side = int(round((blob / depth) ** 0.5))
    side = min(side, 150)
    blobs = [
        ((slice(z0, z0 + depth), slice(4, 4 + side), slice(4, 4 + side)), 1),
        ((slice(z0, z0 + depth), slice(y - 24, y - 4), slice(4, 24)), 2),
        ((slice(z0, z0 + 2), slice(y - 10, y - 6), slice(x - 10, x - 6)), 1),
        ((slice(0, 2), slice(y // 2, y // 2 + 3), slice(4, 7)), 1),
    ]
    if cyst:
        blobs.append(((slice(z0, z0 + depth), slice(4, 24),
                       slice(x - 24, x - 4)), 3))
    for region, value in blobs:
        assert seg[region].max() == 0, "blob would touch the foreground"
        out[region] = value
    return out


@pytest.mark.large  # real KiTS19 data
@pytest.mark.parametrize("case", REAL_CASES)
def test_real_labels_with_false_positives(case):
    path = os.path.join(LABELS_DIR, case, "segmentation.nii.gz")
    if not os.path.exists(path):
        pytest.skip(f"{path} absent")
    # Raw file order (KiTS19: slices first); post-processing does not care
    # about axis order, and io.read_labels' checks take seconds here.
    truth = np.asarray(nib.load(path).dataobj, dtype=np.uint8)
    # No true kidney is removed: the ground truth is its own clean-up.
    assert np.array_equal(pp.postprocess(truth), truth)
    noisy = add_false_positives(truth)
    assert np.count_nonzero(noisy != truth) > 0
    assert np.array_equal(pp.postprocess(noisy), truth)


@pytest.mark.large  # real KiTS23 data
@pytest.mark.parametrize("case", KITS23_CASES)
def test_real_kits23_labels_keep_cysts_and_tumours(case):
    path = os.path.join(KITS23_DIR, case, "segmentation.nii.gz")
    if not os.path.exists(path):
        pytest.skip(f"{path} absent")
    truth = np.asarray(nib.load(path).dataobj, dtype=np.uint8)
    clean = pp.postprocess(truth)
    # Every tumour and cyst voxel of a true kidney is kept. KiTS23's ground
    # truth also has specks of a few voxels (case_00418: 5, 4 and 1 voxels,
    # 4 of them tumour; case_00430: 10 and 2 voxels of tumour alone), away
    # from the kidneys: they go, as clean-up is meant to do.
    bbox, components, sizes, _ = pp.component_table(truth)
    large = np.zeros(truth.shape, bool)
    large[bbox] = sizes[components] >= 100
    large[bbox] &= components > 0
    for c in (2, 3):
        assert (clean[large & (truth == c)] == c).all()
    assert sizes[1:][sizes[1:] < 100].max(initial=0) <= 12
    noisy = add_false_positives(truth, cyst=True)
    assert (noisy == 3).sum() > (truth == 3).sum()
    assert np.array_equal(pp.postprocess(noisy), clean)


def test_cli_postprocess(tmp_path):
    from click.testing import CliRunner

    from cli.postprocess import postprocess as command
    from kits_keras import io
    from kits_keras.synthetic.cases import kits19_affine

    seg = two_kidneys()
    seg[30:38, 40:58, 30:45] = 1
    src, dst = str(tmp_path / "in.nii.gz"), str(tmp_path / "out.nii.gz")
    io.save_nifti(src, seg, kits19_affine((2.0, 0.8, 0.8)))
    result = CliRunner().invoke(command, [src, dst])
    assert result.exit_code == 0, result.output
    assert "2160 voxels removed" in result.output
    out = io.read_labels(dst)
    assert np.array_equal(out.array, two_kidneys())
    assert np.array_equal(io.read_labels(src).array, seg)
    result = CliRunner().invoke(command, [src, dst])
    assert result.exit_code == 1 and "exists" in result.output
