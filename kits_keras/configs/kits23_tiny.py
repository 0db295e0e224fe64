"""``tiny`` on KiTS23's labels (0-3, cyst added), for CPU tests.

Run: ``kits-keras prepare --manual-dir DIR --config kits23_tiny`` on
KiTS23-layout cases (``tfds_kits19/kits23/dummy_data`` for a smoke test)
then ``kits-keras fit --config kits23_tiny``. Output mode as
``kits23_paper``'s.
"""

import dataclasses

from kits_keras.configs import kits23_paper
from kits_keras.configs import tiny


def get_config():
    base = tiny.get_config()
    kits23 = kits23_paper.get_config()
    return dataclasses.replace(
        base, name="kits23_tiny",
        data=dataclasses.replace(base.data, label_set="kits23"),
        model=dataclasses.replace(base.model, num_classes=4,
                                  output_mode=kits23.model.output_mode),
        loss=dataclasses.replace(base.loss,
                                 class_weights=kits23.loss.class_weights),
    )
