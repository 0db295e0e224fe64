"""kits19 dataset."""

from tfds_kits19.kits19.kits19_dataset_builder import Builder  # noqa: F401
