"""Training and validation input pipelines: tf.data from the TFDS volumes.

One loaded (whole, preprocessed) volume gives ``data.patches_per_volume``
patches so that reading and decoding volumes does not dominate. Each patch:

* is centred, with probability ``data.foreground_fraction``, on a random
  foreground voxel (jittered by up to a quarter patch so the voxel is not
  always in the middle), and of those, with probability
  ``data.tumour_fraction``, on a mass voxel (the dataset's
  ``tumour_coords``: tumour; KiTS23 tumour or cyst) when the case has one
  (small tumours decide the tumour Dice); otherwise the patch lies anywhere
  in the volume;
* is augmented by :mod:`kits_keras.data.augment` (one resampling from the whole
  volume for rotation, scaling and elastic deformation; gamma; mirroring);
* is padded where it leaves the volume: the image with the volume's minimum
  (after clipping and normalisation that is the lowest, air-like intensity,
  what lies outside a CT's field of view), the labels with 0 (background).

Seeds: the patch ``j`` of the ``i``-th loaded volume uses stateless random ops
seeded from ``(seed, i * patches_per_volume + j)``; with a fixed seed the
stream of batches is identical on every run.

Outputs: ``image`` float32 ``(B, z, y, x, 1)`` and ``labels``, a tuple with one
int32 ``(B, z/f, y/f, x/f)`` tensor per entry ``f`` of
``kits_keras.model.strides.output_strides(cfg)`` (full resolution first; every ``f``-th voxel,
i.e. nearest neighbour), as multi-scale supervision needs.
"""

import logging

from kits_keras.data import augment
from kits_keras.data.prepared import case_split
from kits_keras.data.prepared import prepared_builder
from kits_keras.data.prepared import volume_dataset
from kits_keras.backend import import_tensorflow
from kits_keras.model import strides as strides_lib

tf = import_tensorflow()
AUTOTUNE = tf.data.AUTOTUNE
log = logging.getLogger(__name__)

# Patch kinds reported by ``sample_patch_start``.
RANDOM, FOREGROUND, TUMOUR = 0, 1, 2
# Features of a TFDS example the pipeline uses.
VOLUME_KEYS = ("image", "labels", "spacing", "foreground_coords",
               "tumour_coords")


def sample_patch_start(shape, patch_size, foreground_coords, tumour_coords,
                       data_config, seed):
    """Corner (z, y, x) of one patch and its kind (RANDOM/FOREGROUND/TUMOUR).

    Random patches lie inside the volume (or, along an axis shorter than the
    patch, hold the whole axis at a random offset). Foreground patches hold
    the chosen voxel at a random offset of up to a quarter patch from their
    centre and are shifted to stay inside the volume as random ones are.
    """
    seeds = augment.split_seed(seed, 4)
    u = tf.random.stateless_uniform([2], seeds[0])
    shape = tf.cast(shape, tf.int32)
    size = tf.constant(patch_size, tf.int32)
    low = tf.minimum(0, shape - size)
    high = tf.maximum(0, shape - size)
    span = tf.cast(high - low + 1, tf.float32)
    offset = tf.random.stateless_uniform([3], seeds[1]) * span
    random_start = low + tf.minimum(tf.cast(offset, tf.int32), high - low)

    n_fg = tf.shape(foreground_coords)[0]
    n_tumour = tf.shape(tumour_coords)[0]
    want_fg = (u[0] < data_config.foreground_fraction) & (n_fg > 0)
    want_tumour = want_fg & (u[1] < data_config.tumour_fraction) & (
        n_tumour > 0
    )
    pool = tf.cond(want_tumour, lambda: tumour_coords,
                   lambda: foreground_coords)
    count = tf.maximum(tf.shape(pool)[0], 1)
    index = tf.random.stateless_uniform(
        [], seeds[2], 0, count, dtype=tf.int32
    )
    voxel = tf.cond(
        tf.shape(pool)[0] > 0,
        lambda: tf.cast(pool[index], tf.int32),
        lambda: tf.zeros([3], tf.int32),
    )
    quarter = tf.cast(size // 4, tf.float32)
    jitter = tf.random.stateless_uniform([3], seeds[3], -1.0, 1.0) * quarter
    fg_start = voxel - size // 2 + tf.cast(tf.round(jitter), tf.int32)
    fg_start = tf.clip_by_value(fg_start, low, high)
    start = tf.where(want_fg, fg_start, random_start)
    kind = tf.where(want_tumour, TUMOUR, tf.where(want_fg, FOREGROUND, RANDOM))
    return start, kind


def label_pyramid(labels, strides):
    """One label map per output stride: ``labels[::fz, ::fy, ::fx]``.

    Works on (z, y, x) or batched (B, z, y, x) labels.
    """
    lead = [slice(None)] * (len(labels.shape) - 3)
    return tuple(
        labels[tuple(lead + [slice(None, None, f) for f in factors])]
        for factors in strides
    )


def patch_seed(seed, volume_index, patch_index, patches_per_volume):
    """(2,) int64 seed of patch ``patch_index`` of volume ``volume_index``."""
    return tf.stack([
        tf.cast(seed, tf.int64),
        tf.cast(volume_index, tf.int64) * patches_per_volume
        + tf.cast(patch_index, tf.int64),
    ])


def _prepare_volume(example):
    """Keeps the used features; fill = image minimum.

    The image keeps its TFDS float16: patches are interpolated in float32
    from it, and gathers reading half the bytes are faster.
    """
    volume = {key: example[key] for key in VOLUME_KEYS}
    volume["fill"] = tf.reduce_min(volume["image"])
    volume["foreground_coords"] = tf.reshape(
        tf.cast(example["foreground_coords"], tf.int32), [-1, 3])
    volume["tumour_coords"] = tf.reshape(
        tf.cast(example["tumour_coords"], tf.int32), [-1, 3])
    return volume


def make_patch_fn(config, seed, augment_config=None, with_kind=False):
    """``fn(volume_index, patch_index, volume) -> (image, labels tuple)``.

    ``augment_config`` None means ``config.augment``; validation passes
    ``config.augment.disabled()``.
    """
    data_config = config.data
    aug_config = augment_config or config.augment
    patch_size = tuple(int(n) for n in data_config.patch_size)
    strides = strides_lib.output_strides(config)
    per_volume = data_config.patches_per_volume

    def fn(volume_index, patch_index, volume):
        seeds = augment.split_seed(
            patch_seed(seed, volume_index, patch_index, per_volume), 2
        )
        start, kind = sample_patch_start(
            tf.shape(volume["labels"]), patch_size,
            volume["foreground_coords"], volume["tumour_coords"],
            data_config, seeds[0],
        )
        image, labels = augment.augment_patch(
            volume["image"], volume["labels"], volume["spacing"], start,
            patch_size, aug_config, seeds[1], volume["fill"],
        )
        out = (image[..., None], label_pyramid(labels, strides))
        return out + (kind,) if with_kind else out

    return fn


def traced_patch_fn(config, augment_config=None, with_kind=False):
    """:func:`make_patch_fn` as one ``tf.function``
    ``fn(seed, volume_index, patch_index, volume)``, traced once.

    A pipeline rebuilt every epoch (a new seed each) calls it instead of
    tracing the augmentation graph again: ~1 s of every epoch on 2 cores.
    """
    def fn(seed, volume_index, patch_index, volume):
        return make_patch_fn(config, seed, augment_config, with_kind)(
            volume_index, patch_index, volume)

    traced = tf.function(fn, reduce_retracing=True)
    # What it was made for, checked by patch_dataset.
    traced.made_for = (augment_config, with_kind)
    return traced


def patch_dataset(volumes, config, seed, training=True, with_kind=False,
                  shard=None, patch_fn=None):
    """Unbatched ``(image (z, y, x, 1), labels tuple)`` patches.

    Args:
        volumes: tf.data.Dataset of dicts with the TFDS features (image
            (z, y, x) normalised, labels uint8, spacing (3,) mm,
            foreground_coords / tumour_coords (N, 3) int32).
        config: ExperimentConfig.
        seed: int. Sampling and augmentation seed.
        training: True shuffles volumes and patches, repeats forever and
            augments; False gives each volume's patches once, un-augmented,
            in order (the same patches on every pass).
        with_kind: also yield each patch's kind (for tests and statistics).
        shard: ``(index, count, global_batch)`` or None. Multi-process
            training: keep only this process's ``global_batch // count``
            consecutive patches of every ``global_batch`` (process ``index``
            of ``count``), chosen before any patch is cut, so each process
            computes only its own. The processes' shards, batched and put
            side by side in process order, are the unsharded stream's
            batches.
        patch_fn: :func:`traced_patch_fn` of ``config`` (and of
            ``config.augment.disabled()`` when not ``training``) to reuse,
            or None to trace the patch function here.
    """
    per_volume = config.data.patches_per_volume
    ds = volumes
    if training:
        ds = ds.shuffle(config.data.shuffle_volumes, seed=seed).repeat()
    ds = ds.map(_prepare_volume, num_parallel_calls=AUTOTUNE).enumerate()
    # Each volume is referenced, not copied, by its patches_per_volume rows.
    ds = ds.flat_map(
        lambda i, volume: tf.data.Dataset.range(per_volume).map(
            lambda j: (i, j, volume)
        )
    )
    if training:  # rows, not patches: before sharding, the same everywhere
        ds = ds.shuffle(2 * per_volume, seed=seed)
    if shard is not None:
        ds = shard_rows(ds, *shard)
    # Validation patches are plain crops: every transform switched off.
    aug = None if training else config.augment.disabled()
    if patch_fn is None:
        cut = make_patch_fn(config, seed, aug, with_kind)
    elif patch_fn.made_for != (aug, with_kind):
        raise ValueError(
            "patch_fn was traced for other patches: (augment_config, "
            f"with_kind) {patch_fn.made_for}, this dataset needs "
            f"{(aug, with_kind)}")
    else:
        seed_tensor = tf.constant(seed, tf.int64)

        def cut(volume_index, patch_index, volume):
            return patch_fn(seed_tensor, volume_index, patch_index, volume)
    return ds.map(cut, num_parallel_calls=AUTOTUNE)


def shard_rows(ds, index, count, global_batch):
    """Rows ``index * n .. (index + 1) * n - 1`` of every ``global_batch``
    consecutive rows of ``ds``, ``n = global_batch // count``.

    Example:
        >>> ds = tf.data.Dataset.range(8)
        >>> [int(v) for v in shard_rows(ds, 1, 2, 4)]
        [2, 3, 6, 7]
    """
    if global_batch % count:
        raise ValueError(
            f"The batch ({global_batch}) must split evenly over {count} "
            f"processes. Received: global_batch={global_batch}")
    local = global_batch // count
    return ds.enumerate().filter(
        lambda k, *row: (k % global_batch) // local == index
    ).map(lambda k, *row: row[0] if len(row) == 1 else row)


def validation_bytes(config):
    """Upper bound of the validation patches' size in memory, bytes:
    ``validation_cases * patches_per_volume`` float32 images and their
    int32 label pyramids."""
    voxels = 1
    for n in config.data.patch_size:
        voxels *= int(n)
    per_patch = 4 * voxels + sum(
        4 * voxels // (fz * fy * fx)
        for fz, fy, fx in strides_lib.output_strides(config))
    return (config.data.validation_cases * config.data.patches_per_volume
            * per_patch)


def in_memory(ds):
    """The finite batched ``ds`` read once and served from memory.

    Every later pass starts at once and costs no reading or resampling
    (Keras starts a new pass of the validation set every epoch: 3-6 s of
    every demo epoch on 2 cores). The batches are the same: only the last
    one of ``ds`` may be short, and ``batch`` cuts the rows at the same
    places.
    """
    import numpy as np

    batches = list(ds.as_numpy_iterator())
    if not batches:
        return ds
    rows = tf.nest.map_structure(lambda *parts: np.concatenate(parts),
                                 *batches)
    size = len(tf.nest.flatten(batches[0])[0])
    return tf.data.Dataset.from_tensor_slices(rows).batch(size)


def batch(ds, batch_size, drop_remainder):
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(
        AUTOTUNE)


def make_train_dataset(config, data_dir, seed=None, shard=None,
                       patch_fn=None):
    """Endless augmented training batches from the prepared TFDS dataset.

    Args:
        config: ExperimentConfig.
        data_dir: TFDS data directory holding ``<data.label_set>/
            <data.dataset>``.
        seed: int. Defaults to ``config.train.seed`` (runs are reproducible
            unless a seed is given).
        shard: ``(index, count)`` or None: this process's share of every
            batch in multi-process training (:func:`patch_dataset`).
        patch_fn: :func:`traced_patch_fn` of ``config`` or None.

    Returns:
        tf.data.Dataset of ``(image (B, z, y, x, 1) float32, labels tuple of
        int32 (B, z/f, y/f, x/f))`` with ``B = config.train.batch_size``
        (divided by the process count with ``shard``).
    """
    seed = config.train.seed if seed is None else int(seed)
    volumes = volume_dataset(config, data_dir, "train", shuffle=True,
                              seed=seed)
    size = config.train.batch_size
    if shard is not None:
        shard = (*shard, size)
        size //= shard[1]
    patches = patch_dataset(volumes, config, seed, training=True,
                            shard=shard, patch_fn=patch_fn)
    return batch(patches, size, drop_remainder=True)


def make_validation_dataset(config, data_dir):
    """Finite, deterministic patches from the held-out validation cases.

    ``patches_per_volume`` un-augmented patches per case, sampled with
    ``config.train.seed`` (foreground oversampling as in training), the same
    on every pass. None (after one log line) when the dataset has no more
    training cases than ``data.validation_cases``.
    """
    train_ids, val_ids = case_split(config, prepared_builder(config, data_dir))
    if not val_ids:
        log.warning(
            "%d training case(s), validation_cases=%d: training without "
            "validation on all of them; the last epoch's model is kept",
            len(train_ids), config.data.validation_cases)
        return None
    volumes = volume_dataset(config, data_dir, "validation")
    patches = patch_dataset(volumes, config, config.train.seed,
                            training=False)
    return batch(patches, config.train.batch_size, drop_remainder=False)
