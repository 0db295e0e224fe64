"""Several trained models as one: their probabilities averaged per tile.

An ensemble of models trained with different seeds (or on different
folds) is how nnU-Net predicts by default; its members make different
mistakes, and the mean of their probabilities is steadier than any one
of them (README, *Quality*: two seeds of the same training).

:class:`Ensemble` is used like :class:`kits_keras.artifact.Artifact`: its
``network`` returns the mean of the members' full-resolution
probabilities (softmax classes or sigmoid regions alike), so the sliding
window, the mirroring, the QC score and the clean-up see one model. The
members must see the same input and speak the same labels: the same
patch size, spacing, intensity statistics, orientation, label set and
output head; anything else is refused with one line naming the member
and the field. Inference settings (``infer``, ``postprocess``) are the
first member's.

Example (two tiny untrained models):

>>> import numpy as np, tempfile, keras
>>> from kits_keras.artifact import save_artifact, load_artifact
>>> from kits_keras.config import get_config
>>> from kits_keras.model.unet import build_unet
>>> from kits_keras.data.intensity import IntensityStats
>>> stats = IntensityStats(-100.0, 300.0, 100.0, 80.0)
>>> paths = []
>>> for seed in (0, 1):
...     keras.utils.set_random_seed(seed)
...     config = get_config("tiny")
...     paths.append(tempfile.mkdtemp() + "/m.keras")
...     _ = save_artifact(build_unet(config), config, stats, paths[-1])
>>> both = Ensemble([load_artifact(p) for p in paths])
>>> batch = np.zeros((1, 32, 64, 64, 1), np.float32)
>>> mean = (both.members[0].network(batch)
...         + both.members[1].network(batch)) / 2
>>> bool(np.allclose(both.network(batch), mean, atol=1e-6))
True
>>> len(both.paths)
2
"""

import dataclasses

import numpy as np

#: What every member must share, as ``(name, getter)``: the input the
#: predictor builds for them and the meaning of their outputs.
SHARED_FIELDS = (
    ("data.patch_size", lambda a: tuple(a.config.data.patch_size)),
    ("data.target_spacing", lambda a: tuple(a.config.data.target_spacing)),
    ("data.label_set", lambda a: a.config.data.label_set),
    ("model.num_classes", lambda a: a.config.model.num_classes),
    ("model.output_mode", lambda a: a.config.model.output_mode),
    ("intensity statistics", lambda a: _as_dict(a.stats)),
    ("orientation", lambda a: tuple(_orientation(a))),
)


def _as_dict(stats):
    if dataclasses.is_dataclass(stats):
        return dataclasses.asdict(stats)
    return dict(stats or {})


def _orientation(art):
    from kits_keras.artifact import orientation_of

    return orientation_of(art.metadata, art.path)


class Ensemble:
    """Models averaged per tile; used like ``Artifact``.

    Attributes:
        members: the loaded models (``Artifact`` or ``SavedModelArtifact``).
        config, stats, metadata: the first member's (the others agree on
            every field of :data:`SHARED_FIELDS`), except that the config
            mirrors only the axes all members were trained mirrored.
        path: str. The members' paths joined with `` + `` (what a report
            names as its model).
        paths: list of str, one per member.

    Raises:
        ValueError: fewer than two members, or members that differ in a
            field of :data:`SHARED_FIELDS` (the message names both paths
            and the field).
    """

    def __init__(self, members):
        members = list(members)
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two models. "
                             f"Received: {len(members)}")
        first = members[0]
        for other in members[1:]:
            for name, get in SHARED_FIELDS:
                if get(other) != get(first):
                    raise ValueError(
                        f"{other.path}: cannot be averaged with "
                        f"{first.path}: {name} differs ({get(other)} vs "
                        f"{get(first)})")
        self.members = members
        # Test-time mirroring flips only the axes every member was trained
        # mirrored (``augment.mirrored_axes``): the smallest p_mirror.
        p_mirror = tuple(min(m.config.augment.p_mirror[axis]
                             for m in members) for axis in range(3))
        self.config = dataclasses.replace(
            first.config, augment=dataclasses.replace(
                first.config.augment, p_mirror=p_mirror))
        self.stats = first.stats
        self.metadata = first.metadata
        self.paths = [str(m.path) for m in members]
        self.path = " + ".join(self.paths)

    @property
    def orientation(self):
        return _orientation(self.members[0])

    def network(self, batch):
        """Mean of the members' probabilities for ``batch`` (float32
        ``(B, z, y, x, 1)``); float32 ``(B, z, y, x, C)``."""
        total = None
        for member in self.members:
            probs = np.asarray(member.network(batch), np.float32)
            total = probs if total is None else total + probs
        return total / np.float32(len(self.members))
