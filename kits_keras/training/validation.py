"""Full-volume validation during training.

Validation Dice on patches, most of them centred on kidney or tumour, never
sees the air, bone and bowel where a network that has not generalised
makes its false positives: it stayed at 0.25-0.35 on cases whose
full-volume Dice was 0.135 (issue 19). :class:`VolumeValidator` runs the
predictor's sliding window (no mirroring) over each whole validation
volume, as ``kits-keras infer`` does, and scores it with the KiTS19 metric,
so the number ``fit`` reports and picks its best checkpoint by is the one
inference will get. It works on the preprocessed volumes of the dataset
(network grid; ``(z, y, x)``), so its Dice differs from Dice on the
original grid only by the resampling.
"""

import logging

import numpy as np

from kits_keras import evaluate
from kits_keras.inference import sliding_window as sw

log = logging.getLogger(__name__)


class VolumeValidator:
    """Callable ``(model, epoch) -> {"kidney_dice", "tumour_dice",
    "dice"}``: means over the validation cases of the per-case KiTS19 Dice
    of a sliding-window prediction.

    Args:
        volumes: list of ``(case_id, image, labels)``: normalised float32
            and uint8 ``(z, y, x)`` arrays on the network grid.
        config: ExperimentConfig (``data.patch_size`` and ``infer``).
    """

    def __init__(self, volumes, config):
        self.volumes = list(volumes)
        self.config = config
        self.last_cases = {}

    def __call__(self, model, epoch):
        from kits_keras.model.unet import full_resolution_model

        network = full_resolution_model(model)

        def run(batch):
            return np.asarray(network(batch, training=False),
                              dtype=np.float32)

        infer = self.config.infer
        scores = {}
        for case_id, image, labels in self.volumes:
            window = sw.sliding_window(
                image, run, self.config.data.patch_size,
                overlap=infer.overlap, tta="none",
                batch_size=infer.batch_size,
                sigma_scale=infer.gaussian_sigma_scale)
            predicted = np.argmax(window.probabilities, axis=-1)
            scores[case_id] = evaluate.kits_scores(predicted, labels)
        self.last_cases = scores
        kidney = float(np.mean([s["kidney_dice"] for s in scores.values()]))
        tumour = float(np.mean([s["tumour_dice"] for s in scores.values()]))
        log.info("epoch %d: full-volume validation kidney %.3f tumour %.3f "
                 "(%d cases)", epoch + 1, kidney, tumour, len(scores))
        return {"kidney_dice": kidney, "tumour_dice": tumour,
                "dice": (kidney + tumour) / 2.0}


def load_validation_volumes(config, data_dir):
    """``[(case_id, image, labels)]`` of the validation split (may be [])."""
    from kits_keras.data import pipeline as data

    return [(ex["case_id"], np.asarray(ex["image"], np.float32),
             np.asarray(ex["labels"], np.uint8))
            for ex in data.load_volumes(config, data_dir, "validation")]
