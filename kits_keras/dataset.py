"""Building the ``kits19`` TFDS dataset (what ``kits-keras prepare`` runs).

The builder itself is ``tfds_kits19/kits19/kits19_dataset_builder.py``; this
module only picks the config, points TFDS at the case folder and reports.
"""

import dataclasses
import logging
import os

from kits_keras import config as kk_config

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    """What :func:`prepare` did.

    Attributes:
        name: str. ``kits19/<config>``, what ``tfds.load`` takes.
        data_dir: str. TFDS data directory.
        path: str. Folder of the prepared version.
        built: bool. False when a finished dataset was found and reused.
        num_examples: dict. Examples per split.
        skipped_cases: dict. Case id -> reason, for cases skipped as bad.
    """

    name: str
    data_dir: str
    path: str
    built: bool
    num_examples: dict
    skipped_cases: dict


def dataset_config_name(name):
    """A TFDS config name, from itself or from an experiment name
    (``paper``/``coarse``/``tiny`` -> that experiment's ``data.dataset``)."""
    if name in kk_config.DATASET_SPACINGS:
        return name
    if name in kk_config.EXPERIMENTS:
        return kk_config.get_config(name).data.dataset
    raise ValueError(
        f"Unknown dataset config. Received: config={name!r}; expected one of "
        f"{sorted(kk_config.DATASET_SPACINGS)} or an experiment name "
        f"{list(kk_config.EXPERIMENTS)}"
    )


def default_data_dir():
    """``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets`` (TFDS's default)."""
    return os.environ.get("TFDS_DATA_DIR",
                          os.path.expanduser("~/tensorflow_datasets"))


def prepare(manual_dir, data_dir=None, config="interp_3.0x0.78mm",
            workers=None, skip_bad_cases=False):
    """Builds ``kits19/<config>`` from KiTS19-layout case folders.

    A finished dataset is found and reused (nothing is recomputed). TFDS
    writes into a temporary ``*.incomplete*`` folder and renames it when
    done, so an interrupted build leaves no half dataset and can be rerun.

    Args:
        manual_dir: str. Folder of ``case_XXXXX/`` (KiTS19 ``data/`` or a
            ``kits-keras synth`` output).
        data_dir: str. TFDS data directory. Defaults to
            :func:`default_data_dir`.
        config: str. TFDS config or experiment name.
        workers: int. Cases processed in parallel (default: usable cores).
        skip_bad_cases: bool. Skip unreadable cases (listed in the result)
            instead of stopping at the first.

    Returns:
        PrepareResult.
    """
    from kits_keras.backend import import_tensorflow

    import_tensorflow()  # hides GPUs before TFDS imports TF
    import tensorflow_datasets as tfds

    from tfds_kits19.kits19 import kits19_dataset_builder

    name = f"kits19/{dataset_config_name(config)}"
    data_dir = os.fspath(data_dir or default_data_dir())
    if not os.path.isdir(manual_dir):
        raise FileNotFoundError(f"{manual_dir}: case folder not found")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1. Received: workers={workers}")
    builder = kits19_dataset_builder.Builder(
        config=dataset_config_name(config), data_dir=data_dir,
        workers=workers, skip_bad_cases=skip_bad_cases)
    built = not builder.is_prepared()
    if built:
        log.info("building %s in %s from %s", name, data_dir, manual_dir)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(manual_dir)))
    else:
        log.info("%s already prepared in %s: nothing to do", name,
                 builder.data_dir)
    meta = builder.info.metadata
    skipped = dict(meta.get("skipped_cases", {}))
    for case_id, reason in skipped.items():
        log.warning("skipped %s: %s", case_id, reason)
    return PrepareResult(
        name=name, data_dir=data_dir, path=os.fspath(builder.data_dir),
        built=built,
        num_examples={k: v.num_examples
                      for k, v in builder.info.splits.items()},
        skipped_cases=skipped,
    )
