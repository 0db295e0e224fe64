"""Tests of kits_keras.data.pipeline on in-memory synthetic volumes, TFDS."""

import dataclasses

import numpy as np
import pytest

from kits_keras import config as config_lib
from kits_keras.data import pipeline as data
from kits_keras.data import prepared
from kits_keras.model.strides import output_strides

tf = data.tf

PATCH = (8, 16, 16)


def make_config(**data_fields):
    cfg = config_lib.get_config("tiny")
    fields = dict(patch_size=PATCH, patches_per_volume=3, shuffle_volumes=2)
    fields.update(data_fields)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, **fields),
        train=dataclasses.replace(cfg.train, batch_size=2),
    )


def synthetic_volume(shape=(14, 48, 40), seed=0, tumour=True):
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    z = min(5, shape[0] - 3)
    labels[z:z + 3, 6:10, 4:9] = 1  # a small kidney near one corner
    if tumour:
        labels[z + 1, 7:9, 5:7] = 2
    image = rng.standard_normal(shape).astype(np.float16)
    return {
        "case_id": f"case_{seed:05d}",
        "image": image,
        "labels": labels,
        "spacing": np.array([4.0, 3.2, 3.2], np.float32),
        "foreground_coords": np.argwhere(labels > 0).astype(np.int32),
        "tumour_coords": np.argwhere(labels == 2).astype(np.int32),
    }


def in_memory_volumes(volumes):
    signature = {
        "case_id": tf.TensorSpec([], tf.string),
        "image": tf.TensorSpec([None, None, None], tf.float16),
        "labels": tf.TensorSpec([None, None, None], tf.uint8),
        "spacing": tf.TensorSpec([3], tf.float32),
        "foreground_coords": tf.TensorSpec([None, 3], tf.int32),
        "tumour_coords": tf.TensorSpec([None, 3], tf.int32),
    }
    return tf.data.Dataset.from_generator(lambda: iter(volumes),
                                          output_signature=signature)


def test_sample_patch_start_kinds_and_containment_eager_and_in_map():
    cfg = make_config(foreground_fraction=0.4, tumour_fraction=0.5)
    vol = synthetic_volume()
    n = 400

    def fn(i):
        return data.sample_patch_start(
            vol["labels"].shape, PATCH, vol["foreground_coords"],
            vol["tumour_coords"], cfg.data,
            tf.stack([tf.constant(3, tf.int64), i]))

    mapped = list(tf.data.Dataset.range(n).map(fn).as_numpy_iterator())
    eager = [tuple(t.numpy() for t in fn(tf.constant(i, tf.int64)))
             for i in range(20)]
    for (s1, k1), (s2, k2) in zip(eager, mapped):
        np.testing.assert_array_equal(s1, s2)
        assert k1 == k2
    kinds = np.array([k for _, k in mapped])
    fg = np.isin(kinds, [data.FOREGROUND, data.TUMOUR]).mean()
    tumour = (kinds == data.TUMOUR).sum() / max(1, (kinds > 0).sum())
    assert abs(fg - 0.4) < 0.07, fg
    assert abs(tumour - 0.5) < 0.1, tumour
    for start, kind in mapped:
        assert (start >= 0).all()
        assert (start + PATCH <= vol["labels"].shape).all()
        box = vol["labels"][tuple(slice(a, a + p)
                                  for a, p in zip(start, PATCH))]
        if kind == data.FOREGROUND:
            assert (box > 0).any()
        if kind == data.TUMOUR:
            assert (box == 2).any()


def test_foreground_share_of_pipeline_patches_matches_config():
    # Random patches here (almost) never touch the small corner kidney, so
    # the share of patches with foreground is the configured ratio.
    cfg = make_config(foreground_fraction=0.5, patches_per_volume=8)
    vols = [synthetic_volume((20, 96, 96), seed=s) for s in range(4)]
    for v in vols:
        v["labels"][:] = 0
        v["labels"][2:4, 2:5, 2:5] = 1
        v["tumour_coords"] = np.zeros((0, 3), np.int32)
        v["foreground_coords"] = np.argwhere(v["labels"] > 0).astype(np.int32)
    ds = data.patch_dataset(in_memory_volumes(vols), cfg, seed=1,
                            with_kind=True).take(240)
    has_fg, kinds = [], []
    for _, labels, kind in ds.as_numpy_iterator():
        has_fg.append((labels[0] > 0).any())
        kinds.append(kind)
    kinds = np.array(kinds)
    assert not (kinds == data.TUMOUR).any()  # no tumour in these cases
    assert abs(np.mean(kinds == data.FOREGROUND) - 0.5) < 0.1
    # Every foreground patch shows it, random ones mostly do not.
    assert all(h for h, k in zip(has_fg, kinds) if k == data.FOREGROUND)
    assert abs(np.mean(has_fg) - 0.5) < 0.12, np.mean(has_fg)


def test_pipeline_shapes_dtypes_pyramid_and_padding():
    cfg = make_config()
    strides = output_strides(cfg)
    small = synthetic_volume((5, 12, 14), seed=1)  # smaller than the patch
    vols = [synthetic_volume(seed=0), small]
    ds = data.batch(data.patch_dataset(in_memory_volumes(vols), cfg, seed=0),
                    cfg.train.batch_size, drop_remainder=True)
    image, labels = next(iter(ds))
    assert image.shape == (2,) + PATCH + (1,) and image.dtype == tf.float32
    assert len(labels) == len(strides) > 1
    for level, factors in zip(labels, strides):
        assert level.dtype == tf.int32
        assert level.shape == (2,) + tuple(p // f for p, f in
                                             zip(PATCH, factors))
        np.testing.assert_array_equal(
            level.numpy(),
            labels[0].numpy()[:, ::factors[0], ::factors[1], ::factors[2]])
    # Validation patches of the small volume: padded, image with its min.
    val = data.patch_dataset(in_memory_volumes([small]), cfg, seed=0,
                             training=False)
    for image, labels in val.as_numpy_iterator():
        assert image.shape == PATCH + (1,)
        assert image.min() == pytest.approx(float(small["image"].min()))
        assert set(np.unique(labels[0])) <= {0, 1, 2}
        # The whole volume's labels are inside the padded patch.
        assert (labels[0] > 0).sum() == (small["labels"] > 0).sum()


def test_same_seed_same_batches_other_seed_other_batches():
    cfg = make_config()
    vols = [synthetic_volume(seed=s) for s in range(3)]

    def first_batches(seed):
        ds = data.batch(data.patch_dataset(in_memory_volumes(vols), cfg, seed),
                        2, drop_remainder=True)
        return [b[0] for b in ds.take(3).as_numpy_iterator()]

    a, b, c = first_batches(5), first_batches(5), first_batches(6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


def test_traced_patch_fn_cuts_the_same_patches_for_any_seed():
    cfg = make_config()
    vols = [synthetic_volume(seed=s) for s in range(2)]
    traced = data.traced_patch_fn(cfg)

    def first_batch(seed, patch_fn):
        ds = data.batch(data.patch_dataset(in_memory_volumes(vols), cfg, seed,
                                           patch_fn=patch_fn),
                        2, drop_remainder=True)
        return next(ds.as_numpy_iterator())

    plain, reused = first_batch(3, None), first_batch(3, traced)
    np.testing.assert_array_equal(plain[0], reused[0])
    for a, b in zip(plain[1], reused[1]):
        np.testing.assert_array_equal(a, b)
    # The seed is an argument of the one trace, not a constant in it.
    assert not np.array_equal(reused[0], first_batch(4, traced)[0])
    assert traced.experimental_get_tracing_count() == 1
    # A training trace is refused for validation patches (un-augmented).
    with pytest.raises(ValueError, match="traced for other patches"):
        data.patch_dataset(in_memory_volumes(vols), cfg, 3, training=False,
                           patch_fn=traced)


def test_in_memory_gives_the_same_batches_short_last_one_included():
    cfg = make_config(patches_per_volume=3)
    vols = [synthetic_volume(seed=0), synthetic_volume(seed=1)]
    ds = data.batch(data.patch_dataset(in_memory_volumes(vols), cfg, seed=0,
                                       training=False),
                    4, drop_remainder=False)  # 6 patches: 4 + 2
    streamed = list(ds.as_numpy_iterator())
    kept = list(data.in_memory(ds).as_numpy_iterator())
    assert [len(x) for x, _ in kept] == [4, 2]
    for (x, ys), (x2, ys2) in zip(streamed, kept):
        np.testing.assert_array_equal(x, x2)
        for y, y2 in zip(ys, ys2):
            np.testing.assert_array_equal(y, y2)


def test_validation_bytes_counts_images_and_label_pyramids():
    cfg = make_config(patches_per_volume=2, validation_cases=3)
    voxels = int(np.prod(PATCH))
    pyramid = sum(voxels // int(np.prod(f)) for f in output_strides(cfg))
    assert data.validation_bytes(cfg) == 3 * 2 * 4 * (voxels + pyramid)


def test_case_split_holds_out_last_ids():
    class Info:
        metadata = {"train_case_ids": ["case_00003", "case_00001",
                                       "case_00002", "case_00000"]}

    class Builder:
        info = Info()

    cfg = make_config(validation_cases=1)
    train, val = prepared.case_split(cfg, Builder())
    assert train == ["case_00000", "case_00001", "case_00002"]
    assert val == ["case_00003"]
    # No more training cases than validation_cases: none held out.
    assert prepared.case_split(make_config(validation_cases=4), Builder()) == (
        ["case_00000", "case_00001", "case_00002", "case_00003"], [])


@pytest.fixture
def tfds_dir(prepared_five_dir):
    """A tiny prepared kits19/demo dataset: 5 synthetic cases (4 train of
    which 1 is held out for validation, 1 test); shared."""
    return prepared_five_dir


def test_tfds_wrappers_split_cases_and_give_batches(tfds_dir):
    cfg = config_lib.get_config("tiny")  # validation_cases=1
    train = {v["case_id"] for v in prepared.load_volumes(cfg, tfds_dir, "train")}
    val = [v for v in prepared.load_volumes(cfg, tfds_dir, "validation")]
    test = {v["case_id"] for v in prepared.load_volumes(cfg, tfds_dir, "test")}
    assert train == {"case_00000", "case_00001", "case_00002"}
    assert [v["case_id"] for v in val] == ["case_00003"]
    assert test == {"case_00004"}
    assert val[0]["image"].ndim == 3 and val[0]["labels"].dtype == np.uint8

    strides = output_strides(cfg)
    ds = data.make_train_dataset(cfg, tfds_dir, seed=1)
    image, labels = next(iter(ds))
    b = cfg.train.batch_size
    assert image.shape == (b,) + cfg.data.patch_size + (1,)
    assert [tuple(t.shape) for t in labels] == [
        (b,) + tuple(p // f for p, f in zip(cfg.data.patch_size, s))
        for s in strides
    ]
    # Validation: finite, the same patches on every pass.
    vds = data.make_validation_dataset(cfg, tfds_dir)
    first = [x for x, _ in vds.as_numpy_iterator()]
    second = [x for x, _ in vds.as_numpy_iterator()]
    assert sum(len(x) for x in first) == cfg.data.patches_per_volume
    for x, y in zip(first, second):
        np.testing.assert_array_equal(x, y)


def test_show_batch_cli_writes_png_and_reports_missing_data(tfds_dir,
                                                            tmp_path):
    from click.testing import CliRunner

    from cli.main import main

    out = tmp_path / "batch.png"
    result = CliRunner().invoke(main, [
        "show-batch", "--data-dir", tfds_dir, "--config", "tiny", "--num",
        "3", "--seed", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, [
        "show-batch", "--data-dir", str(empty), "--config", "tiny",
        "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 1
    assert "no prepared kits19/demo_4.0x3.2mm" in result.output
    assert not (tmp_path / "x.png").exists()
