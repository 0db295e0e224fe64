"""The paper's experiment: 3.0 x 0.78 x 0.78 mm, 48 x 192 x 192 patches.

Run: ``kits-keras prepare --manual-dir kits19/data --config paper`` then
``kits-keras fit --config paper --gpus 2``. The paper trained about 700
epochs of 250 iterations (5 days on two V100s) and reports kidney Dice 0.9741
and tumour Dice 0.8181 on the KiTS19 test set.
"""

from kits_keras.config import ExperimentConfig


def get_config():
    return ExperimentConfig(name="paper")
