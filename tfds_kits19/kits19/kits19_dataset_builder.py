"""KiTS19 kidney and kidney-tumour CT, resampled and normalised, for TFDS.

Each example is one whole case on the config's target grid: the CT clipped
to the training split's foreground 0.5/99.5 percentiles, z-scored with the
foreground mean/std (``kits_keras.data.preprocessing.preprocess_image``, the
same function the predictor calls), and labels resampled as one-hot + argmax.

Split rule (deterministic, documented in README.md): the labelled case ids
are sorted and every fifth one (index % 5 == 4) goes to ``test``, the others
to ``train`` (KiTS19's 210 labelled cases -> 168 train / 42 test, the paper's
sizes). Folders without ``segmentation.nii.gz`` (the KiTS19 challenge test
cases 210-299) are ignored. ``kits_keras.data.pipeline`` holds out the last
``data.validation_cases`` ids of ``metadata["train_case_ids"]`` for
validation.

Small folders: a split with no usable case is left out (fewer than 5
labelled cases have no ``test`` split; so has a folder whose test cases were
all skipped as bad), with one log line; no usable training case is an error.

``metadata["source"]`` fingerprints what the dataset was built from (see
:func:`tfds_kits19.fingerprint.source_fingerprint`); ``kits_keras.data.prepare`` compares it with
the case folder before reusing a dataset.

``metadata["foreground_samples"]``: at most this many voxel coordinates of
each foreground class (kidney-or-tumour, tumour) are stored per case for
oversampling (``foreground_coords``: label > 0; ``tumour_coords``: a label
of the builder's ``MASS_LABELS``, KiTS19's tumour); the experiment's
``data.foreground_samples``, given to the builder by ``kits_keras.dataset.prepare``. It is part of the source
fingerprint (a dataset built with another value is out of date), and
``kits_keras.data.pipeline`` refuses a dataset built with another value than the
experiment's.

``metadata["label_values"]``: the labels the segmentations may hold
(``LABEL_VALUES``). The sibling ``tfds_kits19/kits23`` builder subclasses
:class:`Builder`, changing only the class attributes (labels, masses, split
rule, source files) and the texts.
"""

import concurrent.futures
import dataclasses
import itertools
import logging
import zlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from kits_keras import config as kk_config
from kits_keras import io
from kits_keras.data import intensity
from kits_keras.data import preprocessing
from tfds_kits19 import fingerprint

log = logging.getLogger(__name__)

MANUAL_DOWNLOAD_INSTRUCTIONS = """
Clone https://github.com/neheller/kits19 and run its `python -m
starter_code.get_imaging` (or download the "interpolated" release). Pass the
repository's `data/` folder, which holds `case_00000/ ... case_00299/` each
with `imaging.nii.gz` (and `segmentation.nii.gz` for the 210 labelled cases),
as `manual_dir` (`kits-keras prepare --manual-dir kits19/data`). A folder
written by `kits-keras synth` has the same layout and works the same way.
"""

_CITATION = """
@article{heller2019kits19,
  title={The KiTS19 Challenge Data: 300 Kidney Tumor Cases with Clinical
         Context, CT Semantic Segmentations, and Surgical Outcomes},
  author={Heller, Nicholas and others},
  journal={arXiv preprint arXiv:1904.00445},
  year={2019}
}
"""

KITS19_LABELS = kk_config.LABEL_SETS["kits19"]  # 0 background, 1, 2
TEST_EVERY = 5  # every 5th sorted labelled case (index % 5 == 4) is test


@dataclasses.dataclass
class BuilderConfig(tfds.core.BuilderConfig):
    """A target grid.

    Attributes:
        target_spacing: (z, y, x) mm of the stored volumes.
        stats_voxels: foreground voxels sampled per training case for the
            intensity statistics.
    """

    target_spacing: tuple = (3.0, 0.78, 0.78)
    stats_voxels: int = 100_000


def split_case_ids(case_ids):
    """``(train_ids, test_ids)``: sorted ids, index % 5 == 4 -> test."""
    ordered = sorted(case_ids)
    is_test = [i % TEST_EVERY == TEST_EVERY - 1 for i in range(len(ordered))]
    test = [c for c, t in zip(ordered, is_test) if t]
    train = [c for c, t in zip(ordered, is_test) if not t]
    return train, test


def read_case(case_dir, label_values=KITS19_LABELS):
    """:class:`kits_keras.io.Case` of a labelled ``case_XXXXX/`` folder
    whose labels may take ``label_values`` (an image and labels file on
    one grid; anything else raises :class:`kits_keras.io.CaseError`)."""
    case_dir = epath.Path(case_dir)
    image = io.read_image(str(case_dir / io.IMAGE_FILE))
    labels = io.read_labels(str(case_dir / io.LABELS_FILE),
                            label_values=tuple(label_values))
    io.check_same_grid(image, labels)
    return io.Case(case_dir.name, image, labels)


def labelled_case_dirs(manual_dir):
    """``{case_id: dir}`` of the ``case_XXXXX/`` folders with labels."""
    dirs = {}
    for case_dir in io.find_cases(str(manual_dir)):
        if (epath.Path(case_dir) / io.LABELS_FILE).exists():
            dirs[epath.Path(case_dir).name] = case_dir
        else:
            log.info("%s: no %s, not used", case_dir, io.LABELS_FILE)
    return dirs


def source_fingerprint(manual_dir, foreground_samples, extra_sources=()):
    """:func:`tfds_kits19.fingerprint.source_fingerprint` of the labelled
    cases in ``manual_dir``, this module's code and ``extra_sources`` (a
    subclassing builder's module) included."""
    return fingerprint.source_fingerprint(
        manual_dir, labelled_case_dirs(manual_dir), foreground_samples,
        code_files=(__file__, *extra_sources))


def _coords(mask, max_coords, seed):
    """Up to ``max_coords`` voxel indices of ``mask``, int32 (n, 3): all of
    them, or a seeded uniform sample in raster order."""
    flat = np.flatnonzero(mask)
    if flat.size > max_coords:
        rng = np.random.default_rng(seed)
        flat = np.sort(rng.choice(flat, max_coords, replace=False))
    return np.stack(np.unravel_index(flat, mask.shape), axis=1).astype(np.int32)


def case_foreground_sample(case_dir, max_voxels,
                           label_values=KITS19_LABELS):
    """Foreground HU sample of one case (first pass, for the statistics;
    foreground: label > 0, cysts included)."""
    case = read_case(case_dir, label_values)
    seed = zlib.crc32(case.case_id.encode())
    return intensity.foreground_sample(case.image.array, case.labels.array,
                                       max_voxels, seed)


def process_case(case_dir, stats, target_spacing, max_coords, threads=None,
                 label_values=KITS19_LABELS, mass_labels=(2,)):
    """Loads and preprocesses one case; returns ``(key, example)``.

    A pure function of its arguments (no builder state), so it can run in a
    thread pool here or in ``beam.Map`` for a large dataset (see README).
    ``label_values``: the labels the case may hold (every one is resampled
    as its own class); ``mass_labels``: those whose voxels are stored as
    ``tumour_coords`` for oversampling (KiTS19: tumour; KiTS23: tumour and
    cyst).
    """
    case = read_case(case_dir, label_values)
    image, labels = preprocessing.preprocess_case(
        case, stats, target_spacing, threads=threads,
        num_classes=len(label_values))
    seed = zlib.crc32(case.case_id.encode())
    example = {
        "case_id": case.case_id,
        "image": image.astype(np.float16),
        "labels": labels,
        "spacing": np.asarray(target_spacing, np.float32),
        "original_spacing": np.asarray(case.spacing, np.float32),
        "original_shape": np.asarray(case.image.array.shape, np.int32),
        "affine": np.asarray(case.image.affine, np.float64),
        "foreground_coords": _coords(labels > 0, max_coords, seed),
        "tumour_coords": _coords(np.isin(labels, mass_labels), max_coords,
                                 seed + 1),
    }
    return case.case_id, example


class Builder(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for KiTS19 (one example per case).

    Class attributes a sibling builder (``kits23``) overrides:
    ``LABEL_VALUES`` (labels the segmentations hold), ``MASS_LABELS``
    (stored as ``tumour_coords``), ``split_case_ids`` and ``SPLIT_RULE``
    (train/test split and its description) and ``source_fingerprint``
    (what a build depends on).
    """

    LABEL_VALUES = KITS19_LABELS
    MASS_LABELS = (2,)
    SPLIT_RULE = "sorted labelled case ids; index % 5 == 4 -> test"
    split_case_ids = staticmethod(split_case_ids)
    source_fingerprint = staticmethod(source_fingerprint)
    HOMEPAGE = "https://kits19.grand-challenge.org/"
    CITATION = _CITATION

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        BuilderConfig(
            name=name,
            description=f"Resampled to {spacing} mm (z, y, x), normalised.",
            target_spacing=tuple(spacing),
        )
        for name, spacing in kk_config.DATASET_SPACINGS.items()
    ]

    def __init__(self, *, workers=None, skip_bad_cases=False,
                 foreground_samples=kk_config.DataConfig.foreground_samples,
                 **kwargs):
        """Args beyond TFDS's: ``workers`` (cases processed in parallel,
        default: usable cores), ``skip_bad_cases`` (log and skip cases
        that cannot be read instead of stopping) and ``foreground_samples``
        (coordinates stored per class and case; an experiment's
        ``data.foreground_samples``, whose default it takes)."""
        super().__init__(**kwargs)
        if int(foreground_samples) < 1:
            raise ValueError("foreground_samples must be >= 1. Received: "
                             f"foreground_samples={foreground_samples}")
        self._workers = workers or preprocessing.usable_cores()
        self._skip_bad_cases = skip_bad_cases
        self._foreground_samples = int(foreground_samples)
        self.skipped_cases = {}

    def _info(self) -> tfds.core.DatasetInfo:
        volume = dict(shape=(None, None, None),
                      encoding=tfds.features.Encoding.ZLIB)
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "case_id": tfds.features.Text(),
                "image": tfds.features.Tensor(dtype=np.float16, **volume),
                "labels": tfds.features.Tensor(dtype=np.uint8, **volume),
                "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
                "original_spacing": tfds.features.Tensor(shape=(3,),
                                                         dtype=np.float32),
                "original_shape": tfds.features.Tensor(shape=(3,),
                                                       dtype=np.int32),
                "affine": tfds.features.Tensor(shape=(4, 4),
                                               dtype=np.float64),
                "foreground_coords": tfds.features.Tensor(shape=(None, 3),
                                                          dtype=np.int32),
                "tumour_coords": tfds.features.Tensor(shape=(None, 3),
                                                      dtype=np.int32),
            }),
            supervised_keys=("image", "labels"),
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
            metadata=tfds.core.MetadataDict(),
        )

    def _map(self, fn, case_dirs):
        """Yields ``(case_dir, fn(case_dir) or None if skipped)`` in order,
        ``self._workers`` cases at a time (numpy/scipy/zlib release the
        GIL, so threads use every core without pickling volumes)."""
        with concurrent.futures.ThreadPoolExecutor(self._workers) as pool:
            futures = []
            for case_dir in case_dirs:
                futures.append((case_dir, pool.submit(fn, case_dir)))
                # Keep memory bounded: at most 2 * workers cases in flight.
                while len(futures) > 2 * self._workers:
                    yield self._result(*futures.pop(0))
            for item in futures:
                yield self._result(*item)

    def _result(self, case_dir, future):
        return self._call(case_dir, future.result)

    def _call(self, case_dir, fn):
        """``(case_dir, fn())``, or ``(case_dir, None)`` for a bad case
        skipped with ``skip_bad_cases``."""
        try:
            return case_dir, fn()
        except (io.CaseError, ValueError) as err:
            case_id = epath.Path(case_dir).name
            if not self._skip_bad_cases:
                raise io.CaseError(f"{case_id}: {err}") from None
            log.warning("skipping %s: %s", case_id, err)
            self.skipped_cases[case_id] = str(err)
            return case_dir, None

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = dl_manager.manual_dir
        dirs = labelled_case_dirs(manual_dir)
        if not dirs:
            raise io.CaseError(f"{manual_dir}: no case_XXXXX "
                               f"folder with {io.LABELS_FILE}")
        source = self.source_fingerprint(manual_dir, self._foreground_samples)
        train_ids, test_ids = self.split_case_ids(dirs)
        cfg = self.builder_config
        samples = []
        fn = lambda d: case_foreground_sample(  # noqa: E731
            d, cfg.stats_voxels, self.LABEL_VALUES)
        for _, sample in tfds.core.utils.tqdm(
                self._map(fn, [dirs[c] for c in train_ids]),
                total=len(train_ids), desc="Intensity statistics (train)",
                unit=" cases"):
            if sample is not None:
                samples.append(sample)
        if not samples:
            raise self._no_training_case(manual_dir)
        stats = intensity.stats_from_samples(samples)
        log.info("intensity statistics of %d training cases: %s",
                 len(samples), stats)
        self.info.metadata.update({
            "intensity_stats": stats.to_dict(),
            "train_case_ids": list(train_ids),
            "test_case_ids": list(test_ids),
            "target_spacing": list(cfg.target_spacing),
            "split_rule": self.SPLIT_RULE,
            "label_values": list(self.LABEL_VALUES),
            "mass_labels": list(self.MASS_LABELS),
            "skipped_cases": self.skipped_cases,
            "foreground_samples": self._foreground_samples,
            "source": source,
        })
        # Each split's first example is made here, so that a split with no
        # usable case is left out instead of failing TFDS's writer.
        train = self._nonempty([dirs[c] for c in train_ids], stats)
        if train is None:
            raise self._no_training_case(manual_dir)
        splits = {"train": train}
        test = self._nonempty([dirs[c] for c in test_ids], stats)
        if test is not None:
            splits["test"] = test
        elif test_ids:
            log.warning("no test split: all %d test cases were skipped as "
                        "bad", len(test_ids))
        else:
            log.warning("no test split: %d labelled case(s); every %dth "
                        "sorted case is a test case", len(dirs), TEST_EVERY)
        self._prune_ids()
        return splits

    def _no_training_case(self, manual_dir):
        skipped = sorted(self.skipped_cases)
        shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        return io.CaseError(
            f"{manual_dir}: no usable training case ({len(skipped)} "
            f"skipped as bad: {shown})")

    def _nonempty(self, case_dirs, stats):
        """Examples of ``case_dirs`` with the first one already made, or
        None when no case is usable. The first is made alone with every
        core, so only one finished example waits while another split is
        written."""
        cfg = self.builder_config
        todo = [d for d in case_dirs
                if epath.Path(d).name not in self.skipped_cases]
        while todo:
            case_dir = todo.pop(0)
            _, first = self._call(case_dir, lambda: process_case(  # noqa
                case_dir, stats, cfg.target_spacing,
                self._foreground_samples, preprocessing.usable_cores(),
                self.LABEL_VALUES, self.MASS_LABELS))
            if first is not None:
                return itertools.chain(
                    [first], self._generate_examples(todo, stats))
        return None

    def _prune_ids(self):
        """Drops skipped cases from the metadata's case lists."""
        meta = self.info.metadata
        for key in ("train_case_ids", "test_case_ids"):
            meta[key] = [c for c in meta[key] if c not in self.skipped_cases]

    def _generate_examples(self, case_dirs, stats):
        """Yields ``(case_id, example)``; see README for a Beam variant."""
        cfg = self.builder_config
        threads = max(1, preprocessing.usable_cores() // self._workers)
        fn = lambda d: process_case(d, stats, cfg.target_spacing,  # noqa
                                    self._foreground_samples, threads,
                                    self.LABEL_VALUES, self.MASS_LABELS)
        todo = [d for d in case_dirs
                if epath.Path(d).name not in self.skipped_cases]
        for case_dir, result in self._map(fn, todo):
            if result is None:
                continue
            yield result
        self._prune_ids()
