"""``ExperimentConfig`` is the single source of truth (issue 15, section 2):
every field is read by the code, every change goes through
``config.override``, and what a run saved is what ``infer`` uses."""

import dataclasses
import io as stdlib_io
import json
import os
import pkgutil
import tokenize
import zipfile

import numpy as np
import pytest

from kits_keras import config as config_lib
from kits_keras.config import ExperimentConfig
from kits_keras.config import LossConfig
from kits_keras.config import get_config
from kits_keras.config import override

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where a field must be read: the library and the CLI, not the experiment
# files, which only set fields (their ``base.data`` would count as reading
# the section). config.py and config_sections.py are scanned: their
# dataclasses declare fields without a ``.``, and their helpers' reads are
# real.
SOURCE_DIRS = ("kits_keras", "cli")
EXCLUDED = (os.path.join("kits_keras", "configs"),)


def field_paths(cls, prefix=""):
    """``[(dotted path, field name)]`` of every field of ``cls``, nested
    dataclasses (the sections) included."""
    paths = []
    for field in dataclasses.fields(cls):
        path = prefix + field.name
        paths.append((path, field.name))
        default = getattr(cls(), field.name)
        if dataclasses.is_dataclass(default):
            paths.extend(field_paths(type(default), path + "."))
    return paths


def attributes_read(root=REPO):
    """Names that follow a ``.`` in the code of :data:`SOURCE_DIRS`
    (tokens, so docstrings and comments do not count)."""
    names = set()
    for folder in SOURCE_DIRS:
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for file in files:
                path = os.path.join(dirpath, file)
                rel = os.path.relpath(path, root)
                if not file.endswith(".py") or rel.startswith(EXCLUDED):
                    continue
                with open(path, "rb") as f:
                    tokens = list(tokenize.tokenize(f.readline))
                for dot, name in zip(tokens, tokens[1:]):
                    if (dot.type == tokenize.OP and dot.string == "."
                            and name.type == tokenize.NAME):
                        names.add(name.string)
    return names


def unread_fields(cls, names):
    return [path for path, name in field_paths(cls) if name not in names]


def test_every_config_field_is_read_somewhere():
    # No allow-list: a field that nothing reads is a setting that silently
    # does nothing; read it or delete it.
    assert unread_fields(ExperimentConfig, attributes_read()) == []


def test_the_field_check_finds_an_unread_field():
    @dataclasses.dataclass(frozen=True)
    class Section:
        patch_size: tuple = (1, 1, 1)
        never_read_by_anything: int = 0

    @dataclasses.dataclass(frozen=True)
    class Config:
        data: Section = Section()

    assert unread_fields(Config, attributes_read()) == [
        "data.never_read_by_anything"]
    # Text in docstrings or comments is not a read.
    source = b'"""x.never_read_by_anything"""\n# y.never_read_by_anything\n'
    tokens = list(tokenize.tokenize(stdlib_io.BytesIO(source).readline))
    assert not any(t.string == "never_read_by_anything" for t in tokens
                   if t.type == tokenize.NAME)


def test_experiments_are_the_modules_of_configs():
    from kits_keras import configs

    modules = sorted(m.name for m in pkgutil.iter_modules(configs.__path__))
    assert list(config_lib.EXPERIMENTS) == modules
    assert {"paper", "coarse", "tiny"} <= set(modules)
    for name in modules:
        assert get_config(name).name == name
    with pytest.raises(ValueError, match="Received: config='nope'"):
        get_config("nope")


def test_override_ignores_none_and_refuses_unknown_fields():
    base = get_config("tiny")
    cfg = override(base, train={"epochs": 3, "seed": None},
                   data={"patch_size": [16, 32, 32]},
                   postprocess={"min_fraction": 0.2})
    assert cfg.train.epochs == 3 and cfg.train.seed == base.train.seed
    assert cfg.data.patch_size == (16, 32, 32)  # lists become tuples
    assert cfg.postprocess.min_fraction == 0.2
    assert override(base, train={"epochs": None}) == base
    with pytest.raises(ValueError, match=r"Unknown train config fields. "
                                         r"Received: \['epoch'\]"):
        override(base, train={"epoch": 3})
    with pytest.raises(ValueError, match="Received: 'trainer'"):
        override(base, trainer={"epochs": 3})


def test_postprocess_round_trips_and_old_runs_get_defaults():
    cfg = override(get_config("tiny"), postprocess={"max_components": 1})
    assert ExperimentConfig.from_json(cfg.to_json()) == cfg
    old = get_config("tiny").to_dict()
    del old["postprocess"]  # runs saved before it was a section
    old["augment"]["image_interpolation"] = "linear"  # retired field
    assert ExperimentConfig.from_dict(old) == get_config("tiny")
    old["augment"]["image_interpolation"] = "cubic"
    with pytest.raises(ValueError, match="image_interpolation='cubic'"):
        ExperimentConfig.from_dict(old)


def test_exp_log_loss_takes_its_defaults_from_loss_config():
    from kits_keras.model.losses import ExpLogLoss

    assert ExpLogLoss().loss_config == LossConfig()


def _fake_run(tmp_path, config):
    """A run folder that ``prepare_run`` accepts for resuming: config,
    state and a (readable, empty) checkpoint archive."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(config.to_json())
    (run / "checkpoints" / "state.json").write_text(json.dumps(
        {"epochs_done": 1, "checkpoint": "epoch_0001.keras"}))
    with zipfile.ZipFile(run / "checkpoints" / "epoch_0001.keras", "w"):
        pass
    return str(run)


def test_prepare_run_applies_changes_once(tmp_path):
    from kits_keras.training import run_folder

    base = get_config("tiny")
    run_dir, cfg, state = run_folder.prepare_run(
        base, str(tmp_path / "new"), False,
        {"train": {"seed": 7, "epochs": None}})
    assert state is None and cfg == override(base, train={"seed": 7})
    run = _fake_run(tmp_path, base)
    # Resuming without a config: the run's own, with more epochs.
    _, cfg, state = run_folder.prepare_run(None, run, True,
                                           {"train": {"epochs": 99}})
    assert cfg == override(base, train={"epochs": 99})
    assert state["epochs_done"] == 1
    for changes in ({"train": {"seed": 7}}, {"data": {"patch_size":
                                                      (16, 32, 32)}}):
        with pytest.raises(ValueError, match="only --epochs may change"):
            run_folder.prepare_run(None, run, True, changes)


def test_infer_post_processes_with_the_runs_config():
    """``segment_volume`` cleans up with ``config.postprocess``: a small
    detached 'kidney' is dropped by the default minimum fraction and kept
    when the config lowers it."""
    from kits_keras import io
    from kits_keras.inference.predict import segment_volume
    from kits_keras.data.intensity import IntensityStats

    ct = np.full((32, 64, 64), 40.0, np.float32)  # soft tissue: all body
    ct[10:20, 10:30, 10:30] = 200.0  # 4,000 voxels
    ct[24:26, 50:53, 50:53] = 200.0  # 18 voxels: 0.45 % of the large one
    volume = io.Volume(ct, (4.0, 3.2, 3.2), np.diag([3.2, 3.2, 4.0, 1.0]))
    stats = IntensityStats(clip_low=-100.0, clip_high=300.0, mean=100.0,
                           std=80.0)

    def network(batch):  # kidney wherever the normalised CT is bright
        kidney = (batch[..., 0] > 0.25).astype(np.float32)
        return np.stack([1 - kidney, kidney, np.zeros_like(kidney)], -1)

    config = override(get_config("tiny"), infer={"tta": "none"},
                      model={"output_mode": "softmax"})  # class network
    labels = segment_volume(volume, network, config, stats)[0]
    assert int((labels == 1).sum()) == 4000
    kept = override(config, postprocess={"min_fraction": 0.001})
    labels = segment_volume(volume, network, kept, stats)[0]
    assert int((labels == 1).sum()) == 4018
