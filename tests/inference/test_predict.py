"""Sliding window, mirroring TTA, back-to-grid resampling and QC."""

import numpy as np
import pytest
from scipy import ndimage

from kits_keras import io
from kits_keras.inference import predict
from kits_keras.inference import sliding_window as sw


def one_hot_network(batch):
    """Returns its input (integer labels 0..2) one-hot: a perfect 'model'."""
    labels = np.rint(batch[..., 0]).astype(np.int64)
    return np.eye(3, dtype=np.float32)[labels]


def make_conv_network(seed=0):
    """A small fixed 3-D conv net (3x3x3 conv, ReLU, 1x1 conv, softmax)."""
    rng = np.random.default_rng(seed)
    kernels = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    mix = rng.normal(size=(4, 3)).astype(np.float32)

    def network(batch):
        x = np.asarray(batch[..., 0], dtype=np.float32)
        feats = []
        for k in kernels:
            weights = k[None]
            feats.append(ndimage.correlate(x, weights, mode="constant"))
        h = np.maximum(np.stack(feats, -1), 0.0)
        logits = h @ mix
        logits -= logits.max(-1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(-1, keepdims=True)).astype(np.float32)

    return network


def test_compute_steps_cover_and_spread():
    assert sw.compute_steps((130, 256, 256), (48, 192, 192), 0.5) == [
        [0, 20, 41, 62, 82], [0, 64], [0, 64]]
    assert sw.compute_steps((48, 192, 192), (48, 192, 192), 0.5) == [
        [0], [0], [0]]
    for size, patch in [(100, 32), (33, 32), (200, 64)]:
        (steps,) = sw.compute_steps((size,), (patch,), 0.5)
        assert steps[0] == 0 and steps[-1] + patch == size
        assert max(np.diff(steps), default=0) <= patch * 0.5
    with pytest.raises(ValueError, match="overlap"):
        sw.compute_steps((10,), (4,), 1.0)


def test_gaussian_map_positive_and_peaked():
    g = sw.gaussian_importance_map((8, 16, 16))
    assert g.dtype == np.float32 and g.min() > 0
    assert g.max() == pytest.approx(1.0)
    assert g[4, 8, 8] == g.max()


def test_mirror_axes_counts():
    assert len(sw.mirror_axes("all")) == 8
    assert len(sw.mirror_axes("flip")) == 4
    assert sw.mirror_axes("none") == [()]
    with pytest.raises(ValueError, match="tta"):
        sw.mirror_axes("some")
    # Only the axes the network was trained to see mirrored.
    assert sw.mirror_axes("all", trained=(2,)) == [(), (2,)]
    assert sw.mirror_axes("flip", trained=(0, 2)) == [(), (2,)]
    assert sw.mirror_axes("all", trained=()) == [()]


def test_predict_case_mirrors_only_the_axes_mirrored_in_training():
    from kits_keras.config import get_config
    from kits_keras.config import override
    from kits_keras.data.intensity import IntensityStats
    from kits_keras.synthetic.cases import kits19_affine

    calls = []

    def counting_network(batch):
        calls.append(len(batch))
        return threshold_network(batch)

    spacing = (4.0, 3.2, 3.2)
    image = np.full((32, 64, 64), -100.0, np.float32)
    image[10:20, 20:40, 20:40] = 300.0
    volume = io.Volume(image, spacing, kits19_affine(spacing))
    stats = IntensityStats(clip_low=-200.0, clip_high=400.0, mean=100.0,
                           std=100.0)
    qcs, tiles_seen = [], []
    for p_mirror in [(0.5, 0.5, 0.5), (0.0, 0.0, 0.5)]:
        calls.clear()
        config = override(get_config("tiny"), infer={"tta": "all"},
                          augment={"p_mirror": p_mirror},
                          model={"output_mode": "softmax"})
        pred = predict.predict_case(volume, counting_network, config, stats)
        qcs.append(pred.qc)
        tiles_seen.append(sum(calls))
    assert len(qcs[0]["mirrorings"]) == 8
    assert qcs[1]["mirrorings"] == [[], [2]]
    assert tiles_seen[0] == 4 * tiles_seen[1]


@pytest.mark.parametrize("tta", ["none", "all"])
def test_one_hot_network_reproduced_exactly(tta):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(21, 37, 30)).astype(np.float32)
    result = sw.sliding_window(labels, one_hot_network, (8, 16, 16),
                               overlap=0.5, tta=tta, batch_size=3)
    expected = np.eye(3, dtype=np.float32)[labels.astype(int)]
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
    assert np.array_equal(result.probabilities.argmax(-1), labels)


def test_volume_smaller_than_patch_is_padded():
    labels = np.ones((5, 9, 40), dtype=np.float32)
    result = sw.sliding_window(labels, one_hot_network, (8, 16, 16))
    assert result.probabilities.shape == (5, 9, 40, 3)
    assert np.all(result.probabilities.argmax(-1) == 1)


def test_a_volume_shorter_than_the_patch_is_mirrored_not_walled_in():
    # A constant pad (air) around a thin slab made the tiny model call the
    # air tumour (sliding_window.pad_to_patch); mirrored, the slab's
    # anatomy continues into the pad as it does in a longer scan.
    image = np.linspace(-2.0, 3.0, 4 * 9 * 10, dtype=np.float32).reshape(
        4, 9, 10)
    padded, crop = sw.pad_to_patch(image, (8, 16, 16))
    assert padded.shape == (8, 16, 16)
    np.testing.assert_array_equal(padded[crop], image)
    z0, y0 = crop[0].start, crop[1].start
    assert (z0, y0) == (2, 3)
    # The slices next to the slab repeat its first and last ones, then
    # the next ones in: a mirror, with no value the volume does not hold.
    np.testing.assert_array_equal(padded[z0 - 1], padded[z0])
    np.testing.assert_array_equal(padded[z0 - 2], padded[z0 + 1])
    z1 = crop[0].stop
    np.testing.assert_array_equal(padded[z1], padded[z1 - 1])
    np.testing.assert_array_equal(padded[:, y0 - 1], padded[:, y0])
    assert set(np.unique(padded)) <= set(np.unique(image))
    # 1 slice padded to 8: the slice, repeated.
    padded, crop = sw.pad_to_patch(image[:1], (8, 16, 16))
    np.testing.assert_array_equal(padded[:, crop[1], crop[2]],
                                  np.repeat(image[:1], 8, axis=0))
    # Long enough: untouched (no copy).
    big = np.zeros((8, 16, 16), np.float32)
    assert sw.pad_to_patch(big, (8, 16, 16))[0] is big


def test_conv_network_matches_full_volume_call_away_from_borders():
    network = make_conv_network()
    rng = np.random.default_rng(1)
    image = ndimage.gaussian_filter(rng.normal(size=(24, 40, 44)), 1.5)
    image = image.astype(np.float32)
    full = network(image[None, ..., None])[0]
    result = sw.sliding_window(image, network, (12, 20, 20), overlap=0.5,
                               batch_size=2)
    # A 3x3x3 conv sees one voxel past a tile edge: compare every voxel that
    # is not on the rim of a covering tile (rims on the volume border see
    # the same zero padding as the full call, so they count as interior).
    ok = np.ones(image.shape, dtype=bool)
    steps = sw.compute_steps(image.shape, (12, 20, 20), 0.5)
    for tile in sw._tiles_from_steps(steps, (12, 20, 20)):
        rim = np.zeros(image.shape, dtype=bool)
        rim[tile] = True
        core = tuple(
            slice(s.start + (s.start > 0), s.stop - (s.stop < n))
            for s, n in zip(tile, image.shape)
        )
        rim[core] = False
        ok &= ~rim
    assert result.tiles > 1 and result.network_calls > 1
    assert ok.mean() > 0.5
    assert np.abs(result.probabilities - full)[ok].max() < 1e-4
    assert np.abs(result.probabilities.sum(-1) - 1).max() < 1e-5


def flip_equivariant(batch):
    """Per-voxel function: commutes with every flip."""
    x = batch[..., 0]
    logits = np.stack([np.zeros_like(x), x, x * x - 1.0], -1)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("tta", ["flip", "all"])
def test_mirroring_of_flip_equivariant_function_is_the_function(tta):
    rng = np.random.default_rng(2)
    image = rng.normal(size=(20, 30, 26)).astype(np.float32)
    plain = sw.sliding_window(image, flip_equivariant, (8, 16, 16))
    mirrored = sw.sliding_window(image, flip_equivariant, (8, 16, 16),
                                 tta=tta)
    np.testing.assert_allclose(mirrored.probabilities, plain.probabilities,
                               atol=1e-6)
    np.testing.assert_allclose(plain.probabilities,
                               flip_equivariant(image[None, ..., None])[0],
                               atol=1e-6)
    assert mirrored.disagreement.max() == 0
    score = predict.mirroring_disagreement(mirrored.probabilities,
                                           mirrored.disagreement)
    assert score == 0.0


def test_disagreement_of_a_direction_sensitive_network():
    def shifted(batch):
        # Depends on the x direction: kidney left of centre, tumour right.
        x = np.zeros(batch.shape[:-1] + (3,), dtype=np.float32)
        half = batch.shape[3] // 2
        x[:, :, :, :half, 1] = 1
        x[:, :, :, half:, 2] = 1
        return x

    image = np.zeros((8, 16, 16), dtype=np.float32)
    result = sw.sliding_window(image, shifted, (8, 16, 16), tta="flip")
    score = predict.mirroring_disagreement(result.probabilities,
                                           result.disagreement)
    assert score == 1.0


def test_label_volumes_ml():
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    labels[0, 0, :3] = 1
    labels[1, 1, 1] = 2
    vols = io.label_volumes_ml(labels, (2.0, 1.0, 0.5))
    assert vols == {"kidney_ml": 0.003, "tumour_ml": 0.001,
                    "kidney_and_tumour_ml": 0.004}


def test_label_volumes_ml_kits23():
    labels = np.zeros((2, 2, 2), np.uint8)
    labels[0, 0, :] = 1
    labels[0, 1, 0] = 2
    labels[1, 1, :] = 3
    vols = io.label_volumes_ml(labels, (10.0, 10.0, 10.0), num_classes=4)
    assert vols == {"kidney_ml": 2.0, "tumour_ml": 1.0,
                    "kidney_and_tumour_ml": 3.0, "cyst_ml": 2.0,
                    "kidney_and_masses_ml": 5.0}
    # KiTS19's keys only, whatever the map holds.
    assert set(io.label_volumes_ml(labels, (1, 1, 1))) == {
        "kidney_ml", "tumour_ml", "kidney_and_tumour_ml"}
    with pytest.raises(ValueError, match="num_classes=5"):
        io.label_volumes_ml(labels, (1, 1, 1), num_classes=5)


def threshold_network(batch):
    """Per-voxel 'model': kidney where the normalised intensity is > 1."""
    x = batch[..., 0]
    fg = np.clip((x - 1.0) * 4.0, -30, 30)
    p1 = 1.0 / (1.0 + np.exp(-fg))
    return np.stack([1 - p1, p1, np.zeros_like(p1)], -1).astype(np.float32)


@pytest.mark.parametrize("shape,spacing", [
    # 68 million voxels: the thick-slice case runs the same code fast.
    pytest.param((261, 512, 512), (1.0, 0.94, 0.94),     # thin slices
                 marks=pytest.mark.large),
    ((38, 512, 512), (5.0, 0.82, 0.82)),     # thick slices
    pytest.param((64, 512, 796), (4.0, 0.70, 0.70),      # wide field
                 marks=pytest.mark.large),
])
def test_predict_case_output_on_input_grid(shape, spacing):
    from kits_keras.config import get_config
    from kits_keras.config import override
    from kits_keras.data.intensity import IntensityStats
    from kits_keras.synthetic.cases import kits19_affine

    image = np.full(shape, -100.0, dtype=np.float32)
    # A bright ellipsoid of about 60 x 80 x 80 mm.
    zz, yy, xx = [np.arange(n, dtype=np.float32) * s - n * s / 2
                  for n, s in zip(shape, spacing)]
    inside = ((zz[:, None, None] / 30) ** 2 + (yy[None, :, None] / 40) ** 2
              + (xx[None, None, :] / 40) ** 2) < 1
    image[inside] = 300.0
    volume = io.Volume(image, spacing, kits19_affine(spacing))
    config = override(get_config("tiny"), infer={"tta": "flip"},
                      model={"output_mode": "softmax"})  # class network
    stats = IntensityStats(clip_low=-200.0, clip_high=400.0, mean=100.0,
                           std=100.0)
    pred = predict.predict_case(volume, threshold_network, config, stats)
    assert pred.labels.shape == shape and pred.labels.dtype == np.uint8
    found = pred.labels == 1
    dice = 2 * np.count_nonzero(found & inside) / (found.sum() + inside.sum())
    assert dice > 0.95
    assert pred.qc["mirroring_disagreement"] == 0.0
    assert not pred.qc["flagged"]
    assert set(pred.timings) >= {"preprocess", "network", "resample",
                                 "total"}


def region_network(batch):
    """Sigmoid-like KiTS23 region maps from intensity: above 1 (normalised)
    kidney and masses; above 2 also masses; above 3 also tumour."""
    x = batch[..., 0]
    maps = [1.0 / (1.0 + np.exp(-np.clip((x - t) * 8.0, -30, 30)))
            for t in (0.5, 1.5, 2.5)]
    return np.stack(maps, -1).astype(np.float32)


def test_predict_case_region_mode_writes_kits23_labels():
    from kits_keras.config import get_config
    from kits_keras.config import override
    from kits_keras.data.intensity import IntensityStats
    from kits_keras.synthetic.cases import kits19_affine

    spacing = (4.0, 3.2, 3.2)
    image = np.zeros((20, 40, 40), np.float32)  # background: 0 HU -> 0
    # Normalised (HU / 100): 1 kidney, 2 masses only (cyst), 3 tumour.
    image[4:16, 5:15, 5:35] = 100.0
    image[4:16, 20:30, 5:15] = 200.0
    image[4:16, 20:30, 25:35] = 300.0
    truth = np.rint(image / 100).astype(np.uint8)
    truth = np.choose(truth, [0, 1, 3, 2]).astype(np.uint8)
    volume = io.Volume(image, spacing, kits19_affine(spacing))
    config = override(get_config("kits23_tiny"),
                      model={"output_mode": "regions"},
                      infer={"tta": "flip"})
    stats = IntensityStats(clip_low=-1000.0, clip_high=1000.0, mean=0.0,
                           std=100.0)
    pred = predict.predict_case(volume, region_network, config, stats)
    assert pred.probabilities.shape[-1] == 3
    # Away from the borders (one voxel, where cubic resampling blurs) the
    # labels are the truth: tumour 2, cyst 3, kidney 1.
    inner = ndimage.binary_erosion(truth > 0, iterations=1) | (
        ndimage.binary_dilation(truth > 0, iterations=1) == 0)
    np.testing.assert_array_equal(pred.labels[inner], truth[inner])
    assert pred.qc["mirroring_disagreement"] == 0.0
    # One mL figure per label, cyst included (three channels, four labels).
    assert set(pred.qc["removed_outside_body_ml"]) == {"kidney", "tumour",
                                                       "cyst"}


def test_predict_case_region_mode_kits19():
    # Two regions (kidney + tumour, tumour) for KiTS19's three labels:
    # the QC names the labels, not the channels.
    from kits_keras.config import get_config
    from kits_keras.config import override
    from kits_keras.data.intensity import IntensityStats
    from kits_keras.synthetic.cases import kits19_affine

    spacing = (4.0, 3.2, 3.2)
    image = np.zeros((20, 40, 40), np.float32)
    image[4:16, 5:15, 5:35] = 100.0  # kidney
    image[4:16, 20:30, 5:15] = 200.0  # tumour
    truth = np.rint(image / 100).astype(np.uint8)
    volume = io.Volume(image, spacing, kits19_affine(spacing))
    config = override(get_config("tiny"), model={"output_mode": "regions"},
                      infer={"tta": "none"})
    stats = IntensityStats(clip_low=-1000.0, clip_high=1000.0, mean=0.0,
                           std=100.0)

    def network(batch):
        return region_network(batch)[..., :2]

    pred = predict.predict_case(volume, network, config, stats)
    inner = ndimage.binary_erosion(truth > 0, iterations=1) | (
        ndimage.binary_dilation(truth > 0, iterations=1) == 0)
    np.testing.assert_array_equal(pred.labels[inner], truth[inner])
    assert set(pred.qc["removed_outside_body_ml"]) == {"kidney", "tumour"}
