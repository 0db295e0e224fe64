"""Building the TFDS dataset (what ``kits-keras prepare`` runs).

The builders are ``tfds_kits19/kits19/kits19_dataset_builder.py`` (labels
0-2) and its sibling ``tfds_kits19/kits23/kits23_dataset_builder.py``
(labels 0-3); the experiment's ``data.label_set`` picks one and
``data.dataset`` its config. This module only picks them, points TFDS at
the case folder and reports.
"""

import contextlib
import dataclasses
import fcntl
import importlib
import logging
import os
import shutil

from kits_keras import config as kk_config
from kits_keras import io

log = logging.getLogger(__name__)

LOCK_FILE = ".prepare.lock"
INCOMPLETE_PREFIX = "incomplete."  # TFDS's temporary build folders


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    """What :func:`prepare` did.

    Attributes:
        name: str. ``<label set>/<config>`` (``kits19/...`` or
            ``kits23/...``), what ``tfds.load`` takes.
        data_dir: str. TFDS data directory.
        path: str. Folder of the prepared version.
        built: bool. False when a finished dataset built from the same
            files was found and reused.
        num_examples: dict. Examples per split.
        skipped_cases: dict. Case id -> reason, for cases skipped as bad.
    """

    name: str
    data_dir: str
    path: str
    built: bool
    num_examples: dict
    skipped_cases: dict


def data_config(name):
    """The :class:`kits_keras.config.DataConfig` whose ``dataset`` and
    ``foreground_samples`` ``prepare`` builds: that of an experiment
    (``paper``/``coarse``/``tiny``), or for a TFDS config name the default
    one naming that dataset; a DataConfig is returned as it is."""
    if isinstance(name, kk_config.DataConfig):
        return name
    if name in kk_config.DATASET_SPACINGS:
        return kk_config.DataConfig(dataset=name)
    if name in kk_config.EXPERIMENTS:
        return kk_config.get_config(name).data
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
            workers=None, skip_bad_cases=False, rebuild=False):
    """Builds ``<label_set>/<config>`` from KiTS19-layout case folders.

    A finished dataset is reused only when it was built from the same files
    (case ids; each file's size, modification time and gzip CRC) by the
    same preprocessing code (``metadata["source"]``); otherwise
    ``prepare`` stops with one line saying what changed, or with
    ``rebuild=True`` builds a new one and only then deletes the old. TFDS
    writes into a temporary ``incomplete.*`` folder and renames it when
    done; one left by a killed build is removed by the next. A failed first
    build leaves no folder behind.

    Args:
        manual_dir: str. Folder of ``case_XXXXX/`` (KiTS19 ``data/``,
            KiTS23 ``dataset/`` or a ``kits-keras synth`` output).
        data_dir: str. TFDS data directory. Defaults to
            :func:`default_data_dir`.
        config: str or DataConfig. TFDS config or experiment name, or an
            experiment's ``data`` (see :func:`data_config`).
        workers: int. Cases processed in parallel (default: usable cores).
        skip_bad_cases: bool. Skip unreadable cases (listed in the result)
            instead of stopping at the first.
        rebuild: bool. Replace a dataset built from other files or code.

    Returns:
        PrepareResult.
    """
    data = data_config(config)
    config_name = data.dataset
    name = f"{data.label_set}/{config_name}"
    data_dir = os.fspath(data_dir or default_data_dir())
    _check_inputs(manual_dir, workers)

    from kits_keras.backend import import_tensorflow

    import_tensorflow()  # hides GPUs before TFDS imports TF

    kb = builder_module(data.label_set)

    def make_builder():
        return kb.Builder(config=config_name, data_dir=data_dir,
                          workers=workers, skip_bad_cases=skip_bad_cases,
                          foreground_samples=data.foreground_samples)

    root = os.path.join(data_dir, data.label_set, config_name)
    with _exclusive(root, data_dir):
        _sweep(root)
        builder, built = _build_or_reuse(
            kb, make_builder, name, manual_dir, data.foreground_samples,
            rebuild)
    return _result(name, data_dir, builder, built)


def builder_module(label_set):
    """The TFDS builder module of ``label_set`` ("kits19" or "kits23")."""
    if label_set not in kk_config.LABEL_SETS:
        raise ValueError(f"Unknown label_set. Expected one of "
                         f"{tuple(kk_config.LABEL_SETS)}. Received: "
                         f"{label_set!r}")
    return importlib.import_module(
        f"tfds_kits19.{label_set}.{label_set}_dataset_builder")


def _result(name, data_dir, builder, built):
    """The :class:`PrepareResult` of ``builder``; logs its skipped cases."""
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


def _check_inputs(manual_dir, workers):
    """Refuses a missing or caseless ``manual_dir`` and bad ``workers``."""
    if not os.path.isdir(manual_dir):
        raise FileNotFoundError(f"{manual_dir}: case folder not found")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1. Received: workers={workers}")
    # Before importing TensorFlow (seconds): TFDS would fail on an empty
    # folder with its download instructions and a traceback.
    if not any(os.path.isfile(os.path.join(d, io.LABELS_FILE))
               for d in io.find_cases(os.fspath(manual_dir))):
        raise io.CaseError(f"{manual_dir}: no case_XXXXX folder with "
                           f"{io.LABELS_FILE}")


def _build_or_reuse(kb, make_builder, name, manual_dir, foreground_samples,
                    rebuild):
    """``(builder, built)``: the finished dataset if it was built from the
    same files and code (``built`` False), else a new build; one of other
    files or code is an error unless ``rebuild``. Runs under
    :func:`_exclusive`."""
    from tfds_kits19 import fingerprint

    builder = make_builder()
    source = kb.source_fingerprint(manual_dir, foreground_samples)
    if not os.path.isdir(builder.data_path):
        _build(builder, manual_dir)
        return builder, True
    stored = None  # an unfinished folder: no record either
    if builder.is_prepared():
        stored = (builder.info.metadata or {}).get("source")
    changes = fingerprint.fingerprint_differences(stored, source)
    if not changes:
        log.info("%s already prepared in %s from the same files: "
                 "nothing to do", name, builder.data_dir)
        return builder, False
    if not rebuild:
        raise ValueError(
            f"{builder.data_path}: out of date for {manual_dir} "
            f"({'; '.join(changes)}); pass --rebuild to replace it")
    log.info("rebuilding %s: %s", name, "; ".join(changes))
    return _replace(builder, make_builder, manual_dir), True


def _build(builder, manual_dir):
    import tensorflow_datasets as tfds

    log.info("building %s from %s", builder.data_path, manual_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(manual_dir)))


def _replace(builder, make_builder, manual_dir):
    """Builds a new dataset where ``builder``'s is; the old one is moved
    aside first and put back if the build fails (or deleted after)."""
    path = os.fspath(builder.data_path)
    aside = _aside(path)
    os.replace(path, aside)
    try:
        builder = make_builder()
        _build(builder, manual_dir)
    except BaseException:
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(aside, path)
        raise
    shutil.rmtree(aside)
    return builder


def _aside(path):
    """Where :func:`_replace` keeps the old dataset during a rebuild."""
    parent, version = os.path.split(path)
    return os.path.join(parent, f".replaced.{version}")


def _sweep(root):
    """Cleans up after killed builds: removes TFDS ``incomplete.*`` folders
    and puts back (or, if its rebuild finished, removes) a dataset moved
    aside by :func:`_replace`. Runs under :func:`_exclusive`, so no other
    ``prepare`` is writing there."""
    if not os.path.isdir(root):
        return
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if entry.startswith(INCOMPLETE_PREFIX) and os.path.isdir(path):
            log.info("removing %s, left by an interrupted build", path)
            shutil.rmtree(path)
        elif entry.startswith(".replaced.") and os.path.isdir(path):
            version = os.path.join(root, entry[len(".replaced."):])
            if os.path.isdir(version):
                shutil.rmtree(path)
            else:
                log.info("putting back %s, moved aside by an interrupted "
                         "rebuild", version)
                os.replace(path, version)


@contextlib.contextmanager
def _exclusive(root, data_dir):
    """Holds ``root/.prepare.lock`` (one ``prepare`` per dataset at a time).

    On an exception, folders this call created are removed again
    (:func:`_remove_new`), so a failed first build leaves nothing behind.
    """
    downloads = os.path.join(data_dir, "downloads")  # TFDS makes it
    chain = [root, os.path.dirname(root), os.path.join(downloads,
                                                       "extracted"),
             downloads, data_dir]
    new = [p for p in chain if not os.path.exists(p)]
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, LOCK_FILE), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"{root}: another `kits-keras prepare` is building this "
                "dataset; wait for it to finish") from None
        try:
            yield
        except BaseException:
            _remove_new(new, root, data_dir)
            raise


def _remove_new(new, root, data_dir):
    """Removes the folders of ``new`` (a failed first build's): ``root``
    with all in it, the others (``kits19/`` or ``kits23/`` with TFDS's
    ``.config/``,
    TFDS's empty ``downloads/extracted/``, ``data_dir``) only if nothing
    else is there (another config's dataset may be)."""
    if root in new:
        shutil.rmtree(root, ignore_errors=True)
    dataset = os.path.dirname(root)
    if dataset in new:
        shutil.rmtree(os.path.join(dataset, ".config"), ignore_errors=True)
    for path in new:
        try:
            os.rmdir(path)  # only if empty
        except OSError:
            pass
