"""The dataset ``kits-keras prepare`` wrote: its TFDS builder, split and
volumes.

:func:`prepared_builder` is the one lookup of a prepared dataset (it
refuses one that does not match the config); :func:`case_split` holds out
the validation cases; :func:`volume_dataset` and :func:`load_volumes` read
the whole preprocessed volumes of a split (``(z, y, x)``, normalised image,
uint8 labels) for the patch pipeline (:mod:`kits_keras.data.pipeline`),
full-volume validation and the benchmarks.
"""

from kits_keras.backend import import_tensorflow

tf = import_tensorflow()


def prepared_builder(config, data_dir):
    """The TFDS builder of ``config.data.dataset`` prepared in ``data_dir``
    (the one lookup of a prepared dataset): ``kits19/<dataset>`` or
    ``kits23/<dataset>`` after ``config.data.label_set``.

    Raises:
        FileNotFoundError: when it was not prepared there.
        ValueError: when its labels are not ``model.num_classes`` classes,
            or it stores another ``foreground_samples``.
    """
    import tensorflow_datasets as tfds

    import tfds_kits19  # noqa: F401  (registers kits19 and kits23)

    name = f"{config.data.label_set}/{config.data.dataset}"
    builder = tfds.builder(name, data_dir=data_dir)
    if not tf.io.gfile.exists(builder.data_dir):
        raise FileNotFoundError(
            f"{data_dir}: no prepared {name} dataset there (expected "
            f"{builder.data_dir}); run `kits-keras prepare` first."
        )
    _check_foreground_samples(config, builder)
    _check_num_classes(config, builder)
    return builder


def _check_num_classes(config, builder):
    """Refuses a dataset whose labels are not ``model.num_classes``
    classes: the number of classes comes from the dataset (its
    ``metadata["label_values"]``; datasets built before it was recorded
    are KiTS19's 0-2)."""
    from kits_keras.config import LABEL_SETS

    stored = (builder.info.metadata or {}).get("label_values",
                                               LABEL_SETS["kits19"])
    if len(stored) != config.model.num_classes:
        raise ValueError(
            f"{builder.data_dir}: labels {list(stored)} are "
            f"{len(stored)} classes, the config's model.num_classes is "
            f"{config.model.num_classes}")


def _check_foreground_samples(config, builder):
    """Refuses a dataset that stores another number of foreground
    coordinates per class than ``config.data.foreground_samples`` (the
    setting would otherwise silently do nothing)."""
    from tfds_kits19 import fingerprint

    stored = (builder.info.metadata or {}).get(
        "foreground_samples", fingerprint.UNRECORDED_FOREGROUND_SAMPLES)
    wanted = config.data.foreground_samples
    if stored != wanted:
        raise ValueError(
            f"{builder.data_dir}: built with foreground_samples={stored}, "
            f"the config has {wanted}; run `kits-keras prepare --config "
            f"{config.name} --rebuild`.")


def case_split(config, builder):
    """(training ids, validation ids): the last ``validation_cases`` sorted
    training ids are held out for validation.

    With no more training cases than ``validation_cases`` (a small
    dataset), none are held out: ``(all ids, [])``, and training runs
    without validation (:func:`kits_keras.data.pipeline.make_validation_dataset` says so).
    """
    ids = sorted(builder.info.metadata["train_case_ids"])
    n = config.data.validation_cases
    if n < 0:
        raise ValueError(
            f"validation_cases must be >= 0. Received: validation_cases={n}")
    if n == 0 or n >= len(ids):
        return ids, []
    return ids[:-n], ids[-n:]


def volume_dataset(config, data_dir, split, shuffle=False, seed=0):
    """TFDS examples of ``split``: "train" (without the validation cases),
    "validation" (the held-out training cases) or "test"."""
    import tensorflow_datasets as tfds

    splits = ("train", "validation", "test")
    if split not in splits:
        raise ValueError(
            f"Unknown split. Expected one of {splits}. Received: {split!r}"
        )
    builder = prepared_builder(config, data_dir)
    if split == "test" and "test" not in builder.info.splits:
        raise ValueError(
            f"{builder.data_dir}: this dataset has no test split (fewer "
            "than 5 labelled cases, or every test case was skipped as bad)")
    read_config = tfds.ReadConfig(shuffle_seed=seed,
                                  interleave_cycle_length=2)
    ds = builder.as_dataset(
        split="test" if split == "test" else "train",
        shuffle_files=shuffle,
        read_config=read_config,
    )
    if split != "test":
        train_ids, val_ids = case_split(config, builder)
        ids = train_ids if split == "train" else val_ids
        if not ids:
            return ds.take(0)
        keep = tf.constant(ids)
        ds = ds.filter(
            lambda ex: tf.reduce_any(tf.equal(ex["case_id"], keep))
        )
    return ds


def load_volumes(config, data_dir, split):
    """Whole preprocessed volumes of ``split`` as dicts of numpy arrays.

    ``split``: "train" (minus validation cases), "validation" (may give
    nothing) or "test" (ValueError if the dataset has none). ``case_id``
    comes back as ``str``.
    """
    ds = volume_dataset(config, data_dir, split)
    for example in ds.as_numpy_iterator():
        example["case_id"] = example["case_id"].decode()
        yield example
