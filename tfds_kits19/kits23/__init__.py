"""kits23 dataset."""

from tfds_kits19.kits23.kits23_dataset_builder import Builder  # noqa: F401
