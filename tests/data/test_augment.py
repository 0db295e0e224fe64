"""Tests of kits_keras.data.augment, each op eagerly and inside Dataset.map."""

import dataclasses
import math

import numpy as np
import pytest

from kits_keras.data import augment
from kits_keras.config import AugmentConfig

tf = augment.tf

NONE = AugmentConfig(p_rotation=0.0, p_scale=0.0, p_elastic=0.0,
                     p_gamma=0.0, p_mirror=(0.0, 0.0, 0.0),
                     p_brightness=0.0, p_contrast=0.0, p_noise=0.0,
                     p_blur=0.0, p_low_resolution=0.0)
ALL = AugmentConfig(p_rotation=1.0, p_scale=1.0, p_elastic=1.0,
                    p_gamma=1.0, p_mirror=(0.5, 0.5, 0.5))
SPACING = (3.0, 0.8, 0.8)


def run_both(fn, *args):
    """(eager result, result inside Dataset.map) as numpy structures."""
    eager = tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
    ds = tf.data.Dataset.from_tensors(tuple(args)).map(fn)
    mapped = next(iter(ds.as_numpy_iterator()))
    return eager, mapped


def volume(shape=(12, 40, 36), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal(shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[3:9, 10:30, 8:20] = 1
    labels[5:7, 15:20, 10:14] = 2
    return image, labels


def seed(i):
    return tf.constant([7, i], tf.int64)


def whole_patch_both_ways(config, seed_index, shape=(16, 48, 48)):
    """(image, labels, augmented image, its labels, the image from
    Dataset.map) for a patch covering the whole test volume."""
    image, labels = volume(shape)

    def fn(img, lab):
        return augment.augment_patch(img, lab, SPACING, [0, 0, 0], shape,
                                     config, seed(seed_index), 0.0)

    (out, out_labels), (mapped, _) = run_both(fn, image, labels)
    return image, labels, out, out_labels, mapped


@pytest.mark.parametrize("start", [(2, 5, 4), (-3, 30, -6)])
def test_identity_returns_exact_crop(start):
    image, labels = volume()
    size = (8, 16, 16)

    def fn(image, labels, start, s):
        return augment.augment_patch(image, labels, SPACING, start, size,
                                     NONE, s, -5.0)

    padded_img = np.pad(image, 20, constant_values=-5.0)
    padded_lab = np.pad(labels, 20)
    box = tuple(slice(a + 20, a + 20 + n) for a, n in zip(start, size))
    for out in run_both(fn, image, labels, np.array(start, np.int32),
                        seed(0)):
        np.testing.assert_array_equal(out[0], padded_img[box])
        np.testing.assert_array_equal(out[1], padded_lab[box])
        assert out[0].dtype == np.float32 and out[1].dtype == np.int32


def test_resampling_with_identity_parameters_is_exact_crop():
    image, labels = volume()
    size = (8, 16, 16)
    params = augment.sample_params(NONE, seed(0))

    def fn(image, labels):
        return augment.spatial_transform(image, labels, SPACING, [1, 2, 3],
                                         size, params, 8.0, 0.0)

    for out in run_both(fn, image, labels):
        np.testing.assert_array_equal(out[0], image[1:9, 2:18, 3:19])
        np.testing.assert_array_equal(out[1], labels[1:9, 2:18, 3:19])


def test_mirroring_twice_is_identity():
    image, _ = volume()
    flags = np.array([True, False, True])

    def fn(x, flags):
        return augment.mirror(augment.mirror(x, flags), flags)

    for out in run_both(fn, image, flags):
        np.testing.assert_array_equal(out, image)
    once = augment.mirror(image, flags).numpy()
    np.testing.assert_array_equal(once, image[::-1, :, ::-1])


def test_rotation_by_90_degrees_matches_rot90():
    shape = (6, 20, 20)  # the in-plane centre is the volume centre
    image, labels = volume(shape)
    labels[1, 2:5, 11:17] = 2  # an asymmetric shape
    params = augment.sample_params(NONE, seed(0))
    params["angles"] = tf.constant([math.pi / 2, 0.0, 0.0])

    def fn(image, labels):
        return augment.spatial_transform(image, labels, (1.0, 1.0, 1.0),
                                         [0, 0, 0], shape, params, 8.0, 0.0)

    for out in run_both(fn, image, labels):
        np.testing.assert_allclose(out[0], np.rot90(image, 1, axes=(1, 2)),
                                   atol=1e-4)
        np.testing.assert_array_equal(out[1],
                                      np.rot90(labels, 1, axes=(1, 2)))


def test_rotation_is_in_mm_for_anisotropic_voxels():
    # A 90 degree turn about x swaps z and y in mm: 2 slices of 4 mm become
    # 8 rows of 1 mm.
    shape = (9, 33, 5)
    labels = np.zeros(shape, np.uint8)
    labels[4:6, 16, 2] = 1  # z extent 2 voxels = 8 mm
    params = augment.sample_params(NONE, seed(0))
    params["angles"] = tf.constant([0.0, 0.0, math.pi / 2])
    _, out = augment.spatial_transform(
        np.zeros(shape, np.float32), labels, (4.0, 1.0, 1.0), [0, 0, 0],
        shape, params, 8.0, 0.0)
    zs, ys, _ = np.nonzero(out.numpy())
    assert set(zs) == {4}
    assert ys.max() - ys.min() + 1 == 8


def test_labels_stay_in_label_set_after_every_transform():
    image, labels = volume()
    size = (8, 24, 24)
    single = [
        dataclasses.replace(NONE, p_rotation=1.0),
        dataclasses.replace(NONE, p_scale=1.0),
        dataclasses.replace(NONE, p_elastic=1.0),
        dataclasses.replace(NONE, p_gamma=1.0),
        dataclasses.replace(NONE, p_mirror=(1.0, 1.0, 1.0)),
        ALL,
    ]
    for config in single:
        def fn(s, config=config):
            return augment.augment_patch(image, labels, SPACING, [2, 8, 6],
                                         size, config, s, -1.0)

        eager = [fn(seed(0))[1].numpy()]
        seeds = tf.data.Dataset.range(3).map(lambda i: tf.stack([7, i]))
        mapped = [lab for _, lab in seeds.map(fn).as_numpy_iterator()]
        for out in eager + mapped:
            assert set(np.unique(out)) <= {0, 1, 2}
            assert (out > 0).any()


def test_gamma_retains_mean_and_std():
    image, _ = volume()

    def fn(x):
        return augment.gamma_correction(x, 1.4)

    for out in run_both(fn, image):
        assert abs(out.mean() - image.mean()) < 1e-3
        assert abs(out.std() - image.std()) < 1e-3
        assert not np.allclose(out, image)


def test_same_seed_same_patch_other_seed_other_patch():
    image, labels = volume()

    def fn(image, labels, s):
        return augment.augment_patch(image, labels, SPACING, [2, 8, 6],
                                     (8, 24, 24), ALL, s, -1.0)

    a, a_mapped = run_both(fn, image, labels, seed(1))
    b = fn(image, labels, seed(1))
    c = fn(image, labels, seed(2))
    np.testing.assert_array_equal(a[0], b[0].numpy())
    # Graph mode may fuse float ops differently: equal up to rounding.
    np.testing.assert_allclose(a[0], a_mapped[0], atol=1e-4)
    np.testing.assert_array_equal(a[1], a_mapped[1])
    assert not np.array_equal(a[0], c[0].numpy())


def test_rotated_patch_reads_volume_not_padding_at_corners():
    image = np.ones((10, 64, 64), np.float32)
    labels = np.zeros((10, 64, 64), np.uint8)
    params = augment.sample_params(NONE, seed(0))
    params["angles"] = tf.constant([math.radians(30), 0.0, 0.0])
    out, _ = augment.spatial_transform(image, labels, SPACING, [3, 20, 20],
                                       (4, 24, 24), params, 8.0, -9.0)
    assert (out.numpy() == 1.0).all()


def test_intensity_params_follow_probabilities_and_ranges():
    config = AugmentConfig(p_brightness=0.5, brightness_range=(0.6, 0.7),
                           p_contrast=1.0, contrast_range=(1.3, 1.4),
                           p_noise=0.0, noise_variance=(0.04, 0.09))
    draws = [augment.sample_intensity_params(config, seed(i))
             for i in range(200)]
    brightness = np.array([float(d["brightness"]) for d in draws])
    contrast = np.array([float(d["contrast"]) for d in draws])
    changed = brightness != 1.0
    # p = 0.5: 200 draws give 100 +- 7; 60..140 fails only if p is wrong.
    assert 60 < changed.sum() < 140
    assert np.all((brightness[changed] >= 0.6) & (brightness[changed] < 0.7))
    assert np.all((contrast >= 1.3) & (contrast < 1.4))
    assert all(float(d["noise_std"]) == 0.0 for d in draws)


def test_noise_has_the_drawn_variance_and_leaves_labels_alone():
    config = dataclasses.replace(NONE, p_noise=1.0,
                                 noise_variance=(0.09, 0.09))
    image, labels, out, out_labels, mapped = whole_patch_both_ways(config, 3)
    np.testing.assert_array_equal(out, mapped)
    np.testing.assert_array_equal(out_labels, labels)
    # Noise of std 0.3 added to the image: the difference's std is 0.3.
    assert abs(float(np.std(out - image)) - 0.3) < 0.01


def test_brightness_and_contrast_change_intensities_not_labels():
    image, labels = volume((16, 48, 48))
    config = dataclasses.replace(NONE, p_brightness=1.0,
                                 brightness_range=(1.2, 1.2000001),
                                 p_contrast=1.0, contrast_range=(0.5, 0.5001))
    out, out_labels = augment.augment_patch(
        image, labels, SPACING, [0, 0, 0], (16, 48, 48), config, seed(4), 0.0)
    out = out.numpy()
    np.testing.assert_array_equal(out_labels.numpy(), labels)
    scaled = image * 1.2
    expected = (scaled - scaled.mean()) * 0.5 + scaled.mean()
    np.testing.assert_allclose(out, expected, atol=1e-3)


def test_disabled_config_gives_the_plain_crop():
    # Every transform, intensity ones included, is off in the validation
    # config: the patch is exactly the crop.
    image, labels = volume()
    off = AugmentConfig(p_brightness=1.0, p_contrast=1.0, p_noise=1.0,
                        p_blur=1.0, p_low_resolution=1.0,
                        p_gamma=1.0, p_rotation=1.0).disabled()
    out, out_labels = augment.augment_patch(
        image, labels, SPACING, [1, 2, 3], (8, 16, 16), off, seed(5), 0.0)
    np.testing.assert_array_equal(out.numpy(), image[1:9, 2:18, 3:19])
    np.testing.assert_array_equal(out_labels.numpy(), labels[1:9, 2:18, 3:19])


def test_resolution_params_follow_probabilities_and_ranges():
    config = AugmentConfig(p_blur=0.5, blur_sigma=(0.6, 0.9),
                           p_low_resolution=1.0,
                           low_resolution_zoom=(0.5, 0.7))
    draws = [augment.sample_resolution_params(config, seed(i))
             for i in range(200)]
    sigma = np.array([d["blur_sigma"].numpy() for d in draws])
    zoom = np.array([float(d["zoom"]) for d in draws])
    blurred = (sigma > 0).all(axis=1)
    assert ((sigma > 0).any(axis=1) == blurred).all()
    # p = 0.5: 200 draws give 100 +- 7; 60..140 fails only if p is wrong.
    assert 60 < blurred.sum() < 140
    assert np.all((sigma[blurred] >= 0.6) & (sigma[blurred] < 0.9))
    # A sigma per axis, not one for all three.
    assert np.all(np.ptp(sigma[blurred], axis=1) > 0)
    assert np.all((zoom >= 0.5) & (zoom < 0.7))


def test_blur_smooths_noise_keeps_the_mean_and_the_labels():
    config = dataclasses.replace(NONE, p_blur=1.0, blur_sigma=(1.0, 1.0001))
    image, labels, out, out_labels, mapped = whole_patch_both_ways(config, 6)
    np.testing.assert_allclose(out, mapped, atol=1e-6)
    np.testing.assert_array_equal(out_labels, labels)
    # White noise through a sigma-1 Gaussian in 3-D keeps
    # 1 / (2 sqrt(pi))^3 = 0.0224 of its variance (the std: 0.15).
    assert 0.12 < float(np.std(out)) < 0.18
    assert abs(float(out.mean()) - float(image.mean())) < 0.01
    # A constant patch stays constant: the faces reflect, not pad zeros.
    flat = augment.gaussian_blur(tf.ones((6, 9, 9)), tf.constant([1.0] * 3))
    np.testing.assert_allclose(flat.numpy(), 1.0, atol=1e-5)


def test_low_resolution_coarsens_the_image_not_the_labels():
    config = dataclasses.replace(NONE, p_low_resolution=1.0,
                                 low_resolution_zoom=(0.5, 0.5001))
    image, labels, out, out_labels, mapped = whole_patch_both_ways(config, 7)
    np.testing.assert_allclose(out, mapped, atol=1e-6)
    np.testing.assert_array_equal(out_labels, labels)
    assert out.shape == image.shape
    # Half the voxels per axis: an eighth of the samples survive, so white
    # noise keeps far less than its variance after interpolation.
    assert float(np.std(out)) < 0.7
    # Neighbouring voxels now correlate (they did not in the noise).
    corr = np.corrcoef(out[:, :, :-1].ravel(), out[:, :, 1:].ravel())[0, 1]
    assert corr > 0.5
    flat = augment.simulate_low_resolution(tf.fill((8, 20, 20), 2.5),
                                           tf.constant(0.6))
    np.testing.assert_allclose(flat.numpy(), 2.5, atol=1e-5)


def test_tumour_contrast_moves_the_tumour_towards_the_kidney():
    config = dataclasses.replace(NONE, p_tumour_contrast=1.0,
                                 tumour_contrast_range=(0.8, 0.8001))
    shape = (12, 40, 36)
    image, labels = volume(shape)
    image = (image + np.where(labels == 1, 1.0, 0.0)
             - np.where(labels == 2, 2.0, 0.0)).astype(np.float32)

    def fn(img, lab):
        return augment.augment_patch(img, lab, SPACING, [0, 0, 0], shape,
                                     config, seed(8), 0.0)

    (out, out_labels), (mapped, _) = run_both(fn, image, labels)
    np.testing.assert_allclose(out, mapped, atol=1e-6)
    np.testing.assert_array_equal(out_labels, labels)
    tumour, kidney = labels == 2, labels == 1
    before = image[kidney].mean() - image[tumour].mean()
    after = out[kidney].mean() - out[tumour].mean()
    # 0.8 of the gap closed: all of the tumour moves; the kidney voxels
    # next to it move a little too (the mask fades outside the tumour).
    assert 0.2 * before < after < 0.45 * before
    # Texture kept: the noise inside the tumour is not flattened.
    assert abs(out[tumour].std() - image[tumour].std()) < 0.3
    # Far from the tumour nothing moves.
    np.testing.assert_array_equal(out[:, :, 30:], image[:, :, 30:])
    # Without a tumour in the patch the image is returned as it is.
    plain = augment.tumour_contrast(tf.constant(image),
                                    np.minimum(labels, 1), tf.constant(0.8))
    np.testing.assert_array_equal(plain.numpy(), image)


def test_tumour_contrast_params_follow_probability_and_range():
    config = AugmentConfig(p_tumour_contrast=0.5,
                           tumour_contrast_range=(-0.3, 0.8))
    drawn = np.array([float(augment.sample_tumour_contrast(config, seed(i)))
                      for i in range(200)])
    assert 60 < np.sum(drawn != 0.0) < 140
    assert np.all((drawn >= -0.3) & (drawn < 0.8))
    assert np.all(augment.sample_tumour_contrast(
        AugmentConfig(), seed(0)).numpy() == 0.0)
