"""The paper's network on KiTS23: labels 0-3 (cyst added), its three HECs.

Run: ``kits-keras prepare --manual-dir kits23/dataset --config
kits23_paper`` then ``kits-keras fit --config kits23_paper --gpus 2``. The
same grid (3.0 x 0.78 x 0.78 mm), patch and schedule as ``paper``; the
cyst gets the tumour's cross-entropy weight (both are small masses).
Output mode: see ``OUTPUT_MODE`` below. Not yet trained on KiTS23 here: no
runtime or Dice to report.
"""

import dataclasses

from kits_keras.configs import paper

# Measured on synthetic 4-class cases (tests/training/test_overfit_kits23.py,
# see its header): both modes fit one case; this is the default.
OUTPUT_MODE = "softmax"


def get_config():
    base = paper.get_config()
    return dataclasses.replace(
        base,
        name="kits23_paper",
        data=dataclasses.replace(base.data, label_set="kits23"),
        model=dataclasses.replace(base.model, num_classes=4,
                                  output_mode=OUTPUT_MODE),
        loss=dataclasses.replace(base.loss,
                                 class_weights=(1.0, 1.0, 2.0, 2.0)),
    )
