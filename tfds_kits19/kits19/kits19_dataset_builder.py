"""KiTS19 kidney and kidney-tumour CT, resampled and normalised, for TFDS.

Each example is one whole case on the config's target grid: the CT clipped
to the training split's foreground 0.5/99.5 percentiles, z-scored with the
foreground mean/std (``kits_keras.preprocessing.preprocess_image``, the same
function the predictor calls), and labels resampled as one-hot + argmax.

Split rule (deterministic, documented in README.md): the labelled case ids
are sorted and every fifth one (index % 5 == 4) goes to ``test``, the others
to ``train`` (KiTS19's 210 labelled cases -> 168 train / 42 test, the paper's
sizes). Folders without ``segmentation.nii.gz`` (the KiTS19 challenge test
cases 210-299) are ignored. ``kits_keras.data`` holds out the last
``data.validation_cases`` ids of ``metadata["train_case_ids"]`` for
validation.
"""

import concurrent.futures
import dataclasses
import logging
import zlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from kits_keras import config as kk_config
from kits_keras import io
from kits_keras import preprocessing

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

TEST_EVERY = 5  # every 5th sorted labelled case (index % 5 == 4) is test


@dataclasses.dataclass
class BuilderConfig(tfds.core.BuilderConfig):
    """A target grid.

    Attributes:
        target_spacing: (z, y, x) mm of the stored volumes.
        max_coords: at most this many foreground (and tumour) voxel
            coordinates stored per case for oversampling.
        stats_voxels: foreground voxels sampled per training case for the
            intensity statistics.
    """

    target_spacing: tuple = (3.0, 0.78, 0.78)
    max_coords: int = 10_000
    stats_voxels: int = 100_000


def split_case_ids(case_ids):
    """``(train_ids, test_ids)``: sorted ids, index % 5 == 4 -> test."""
    ordered = sorted(case_ids)
    is_test = [i % TEST_EVERY == TEST_EVERY - 1 for i in range(len(ordered))]
    test = [c for c, t in zip(ordered, is_test) if t]
    train = [c for c, t in zip(ordered, is_test) if not t]
    return train, test


def labelled_case_dirs(manual_dir):
    """``{case_id: dir}`` of the ``case_XXXXX/`` folders with labels."""
    dirs = {}
    for case_dir in io.find_cases(str(manual_dir)):
        if (epath.Path(case_dir) / io.LABELS_FILE).exists():
            dirs[epath.Path(case_dir).name] = case_dir
        else:
            log.info("%s: no %s, not used", case_dir, io.LABELS_FILE)
    return dirs


def _coords(mask, max_coords, seed):
    """Up to ``max_coords`` voxel indices of ``mask``, int32 (n, 3)."""
    flat = np.flatnonzero(mask)
    if flat.size > max_coords:
        rng = np.random.default_rng(seed)
        flat = np.sort(rng.choice(flat, max_coords, replace=False))
    return np.stack(np.unravel_index(flat, mask.shape), axis=1).astype(np.int32)


def case_foreground_sample(case_dir, max_voxels):
    """Foreground HU sample of one case (first pass, for the statistics)."""
    case = io.load_case(case_dir)
    seed = zlib.crc32(case.case_id.encode())
    return preprocessing.foreground_sample(case.image.array,
                                           case.labels.array, max_voxels, seed)


def process_case(case_dir, stats, target_spacing, max_coords, threads=None):
    """Loads and preprocesses one case; returns ``(key, example)``.

    A pure function of its arguments (no builder state), so it can run in a
    thread pool here or in ``beam.Map`` for a large dataset (see README).
    """
    case = io.load_case(case_dir)
    image, labels = preprocessing.preprocess_case(case, stats, target_spacing,
                                                  threads=threads)
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
        "tumour_coords": _coords(labels == 2, max_coords, seed + 1),
    }
    return case.case_id, example


class Builder(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for KiTS19 (one example per case)."""

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

    def __init__(self, *, workers=None, skip_bad_cases=False, **kwargs):
        """Args beyond TFDS's: ``workers`` (cases processed in parallel,
        default: usable cores) and ``skip_bad_cases`` (log and skip cases
        that cannot be read instead of stopping)."""
        super().__init__(**kwargs)
        self._workers = workers or preprocessing.usable_cores()
        self._skip_bad_cases = skip_bad_cases
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
            homepage="https://kits19.grand-challenge.org/",
            citation=_CITATION,
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
        try:
            return case_dir, future.result()
        except (io.CaseError, ValueError) as err:
            case_id = epath.Path(case_dir).name
            if not self._skip_bad_cases:
                raise io.CaseError(f"{case_id}: {err}") from None
            log.warning("skipping %s: %s", case_id, err)
            self.skipped_cases[case_id] = str(err)
            return case_dir, None

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        dirs = labelled_case_dirs(dl_manager.manual_dir)
        if not dirs:
            raise io.CaseError(f"{dl_manager.manual_dir}: no case_XXXXX "
                               f"folder with {io.LABELS_FILE}")
        train_ids, test_ids = split_case_ids(dirs)
        cfg = self.builder_config
        samples = []
        fn = lambda d: case_foreground_sample(d, cfg.stats_voxels)  # noqa
        for _, sample in tfds.core.utils.tqdm(
                self._map(fn, [dirs[c] for c in train_ids]),
                total=len(train_ids), desc="Intensity statistics (train)",
                unit=" cases"):
            if sample is not None:
                samples.append(sample)
        stats = preprocessing.stats_from_samples(samples)
        log.info("intensity statistics of %d training cases: %s",
                 len(samples), stats)
        ok = lambda ids: [c for c in ids if c not in self.skipped_cases]  # noqa
        self.info.metadata.update({
            "intensity_stats": stats.to_dict(),
            "train_case_ids": ok(train_ids),
            "test_case_ids": ok(test_ids),
            "target_spacing": list(cfg.target_spacing),
            "split_rule": "sorted labelled case ids; index % 5 == 4 -> test",
            "skipped_cases": self.skipped_cases,
        })
        return {
            "train": self._generate_examples([dirs[c] for c in train_ids],
                                             stats),
            "test": self._generate_examples([dirs[c] for c in test_ids],
                                            stats),
        }

    def _generate_examples(self, case_dirs, stats):
        """Yields ``(case_id, example)``; see README for a Beam variant."""
        cfg = self.builder_config
        threads = max(1, preprocessing.usable_cores() // self._workers)
        fn = lambda d: process_case(d, stats, cfg.target_spacing,  # noqa
                                    cfg.max_coords, threads)
        todo = [d for d in case_dirs
                if epath.Path(d).name not in self.skipped_cases]
        for case_dir, result in self._map(fn, todo):
            if result is None:
                continue
            yield result
        meta = self.info.metadata
        for key in ("train_case_ids", "test_case_ids"):
            meta[key] = [c for c in meta[key] if c not in self.skipped_cases]
