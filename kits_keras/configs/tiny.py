"""A tiny U-Net on very coarse data, for CPU tests and ``kits-keras demo``.

Run: ``kits-keras demo`` (synthesis, dataset, training, inference and
evaluation on synthetic cases in minutes on a 2-core CPU).
"""

import dataclasses

from kits_keras.configs import paper


def get_config():
    base = paper.get_config()
    return dataclasses.replace(
        base,
        name="tiny",
        data=dataclasses.replace(
            base.data,
            dataset="demo_4.0x3.2mm",
            patch_size=(32, 64, 64),
            # Half the patches on foreground: minutes of training must see
            # enough tumour.
            foreground_fraction=0.5,
            patches_per_volume=4,
            shuffle_volumes=4,
            validation_cases=1,
            foreground_samples=2000,
        ),
        model=dataclasses.replace(
            base.model, num_levels=4, base_filters=8, max_filters=64
        ),
        train=dataclasses.replace(
            base.train, epochs=60, steps_per_epoch=25, batch_size=2,
            # A 10x larger step than the paper's: the demo has minutes,
            # not days, and the tiny network trains stably with it.
            learning_rate=3e-3, lr_patience=8, metric_smoothing=3,
        ),
        infer=dataclasses.replace(base.infer, tta="flip", batch_size=4),
    )
