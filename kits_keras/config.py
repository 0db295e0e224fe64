"""The one configuration object that flows from the CLI to every stage.

An :class:`ExperimentConfig` groups frozen dataclasses for data, augmentation,
model, loss, training, inference and post-processing. Named experiments live
in ``kits_keras/configs/<name>.py``, each with a ``get_config()``; variants
import a base and override fields with :func:`dataclasses.replace`. Every
later change (command-line flags, the demo, benchmarks) goes through
:func:`override`. Every field is read by the code (``tests/test_config.py``
checks it): a field nothing reads would be a setting that silently does
nothing.

The sections' dataclasses and the names their fields choose from
(``LABEL_SETS``, ``DATASET_SPACINGS``, ...) are defined in
:mod:`kits_keras.config_sections` and used from here.

Axis order everywhere is ``(z, y, x)``; spacings are in mm.
"""

import dataclasses
import importlib
import json
import pkgutil

from kits_keras import configs as _configs
from kits_keras.config_sections import DATASET_SPACINGS  # noqa: F401
from kits_keras.config_sections import LABEL_SETS  # noqa: F401
from kits_keras.config_sections import LR_SCHEDULES  # noqa: F401
from kits_keras.config_sections import OUTPUT_MODES  # noqa: F401
from kits_keras.config_sections import AugmentConfig
from kits_keras.config_sections import DataConfig
from kits_keras.config_sections import InferenceConfig
from kits_keras.config_sections import LossConfig
from kits_keras.config_sections import ModelConfig
from kits_keras.config_sections import PostprocessConfig
from kits_keras.config_sections import TrainConfig

# The experiments are the modules of ``kits_keras/configs/``: adding a file
# there adds an experiment.
EXPERIMENTS = tuple(sorted(
    m.name for m in pkgutil.iter_modules(_configs.__path__)))


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one experiment needs, from data to post-processing.

    Saved with the model (``config.json`` and inside ``model.keras``), so
    ``infer`` runs with the inference and post-processing settings the run
    was made with.
    """

    name: str = "paper"
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    infer: InferenceConfig = InferenceConfig()
    postprocess: PostprocessConfig = PostprocessConfig()

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d):
        """Inverse of :meth:`to_dict`; lists become tuples again.

        A section missing from ``d`` (``postprocess`` in runs saved before
        it was part of the config) takes its defaults. A retired field
        (:data:`RETIRED_FIELDS`) is accepted only with the value the code
        now always uses.
        """
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key not in sections:
                raise ValueError(f"Unknown config section. Received: {key!r}")
            if key == "name":
                kwargs[key] = value
                continue
            section_cls = type(getattr(cls(), key))
            known = {f.name for f in dataclasses.fields(section_cls)}
            value = _without_retired(key, value)
            unknown = set(value) - known
            if unknown:
                raise ValueError(
                    f"Unknown {key} config fields. Received: {sorted(unknown)}"
                )
            kwargs[key] = section_cls(
                **{k: _tuples(v) for k, v in value.items()}
            )
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(json.loads(text))


# Fields that older runs stored and the code no longer has, with the only
# value those runs could have used (anything else would have been ignored or
# refused then too).
RETIRED_FIELDS = {
    # Trilinear was the only interpolation implemented.
    ("augment", "image_interpolation"): "linear",
}


_ABSENT = object()


def _without_retired(section, fields):
    kept = {}
    for key, value in fields.items():
        retired = RETIRED_FIELDS.get((section, key), _ABSENT)
        if retired is _ABSENT:
            kept[key] = value
        elif value != retired:
            raise ValueError(
                f"{section}.{key} is no longer a setting (always "
                f"{retired!r}). Received: {key}={value!r}")
    return kept


def _tuples(value):
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def get_config(name):
    """Returns the named experiment from ``kits_keras/configs/<name>.py``.

    Raises:
        ValueError: for a name that is not a known experiment.
    """
    if name not in EXPERIMENTS:
        raise ValueError(
            f"Unknown config. Expected one of {EXPERIMENTS}. Received: "
            f"config={name!r}"
        )
    module = importlib.import_module(f"kits_keras.configs.{name}")
    return module.get_config()


def override(config, **sections):
    """Returns ``config`` with fields of its sections replaced.

    The one function that changes a config after ``get_config``: command-
    line flags (``fit``, ``infer``), the demo and the benchmarks all go
    through it. A ``None`` value keeps the config's value (an option not
    given); lists become tuples, as in :meth:`ExperimentConfig.from_dict`.

    Args:
        config: ExperimentConfig.
        **sections: section name -> ``{field: value}``, or ``name=str``.

    Raises:
        ValueError: for an unknown section or field.

    Example:
        >>> cfg = override(get_config("tiny"), train={"epochs": 2,
        ...                                           "seed": None})
        >>> cfg.train.epochs, cfg.train.seed
        (2, 0)
    """
    changes = {}
    for section, fields in sections.items():
        if section == "name":
            if fields is not None:
                changes["name"] = str(fields)
            continue
        current = getattr(config, section, None)
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"Unknown config section. Received: {section!r}")
        known = {f.name for f in dataclasses.fields(current)}
        given = {k: _tuples(v) for k, v in (fields or {}).items()
                 if v is not None}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(
                f"Unknown {section} config fields. Received: {unknown}")
        changes[section] = dataclasses.replace(current, **given)
    return dataclasses.replace(config, **changes)
