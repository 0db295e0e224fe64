"""kits23 dataset builder test over the tiny cases in dummy_data/."""

import numpy as np
import tensorflow_datasets as tfds

from kits_keras.config import DataConfig
from tfds_kits19.kits23 import kits23_dataset_builder


class Kits23Test(tfds.testing.DatasetBuilderTestCase):
    """Builds the demo config from dummy_data/ (6 cases with cysts: 4
    train, 2 test by case number, case_00004 and case_00404); the configs
    are kits19's (its large test builds the finer ones)."""

    DATASET_CLASS = kits23_dataset_builder.Builder
    SPLITS = {"train": 4, "test": 2}
    SKIP_TF1_GRAPH_MODE = True
    BUILDER_CONFIG_NAMES_TO_TEST = ["demo_4.0x3.2mm"]

    def test_metadata_and_labels(self):
        builder = self._make_builder(config="demo_4.0x3.2mm")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=self.dummy_data))
        meta = builder.info.metadata
        self.assertEqual(meta["test_case_ids"], ["case_00004", "case_00404"])
        self.assertEqual(meta["train_case_ids"], [
            "case_00000", "case_00001", "case_00002", "case_00400"])
        self.assertEqual(meta["label_values"], [0, 1, 2, 3])
        self.assertEqual(meta["mass_labels"], [2, 3])
        self.assertEqual(meta["foreground_samples"],
                         DataConfig.foreground_samples)
        self.assertEqual(meta["source"],
                         kits23_dataset_builder.source_fingerprint(
                             self.dummy_data, DataConfig.foreground_samples))
        for ex in tfds.as_numpy(builder.as_dataset(split="train")):
            labels = ex["labels"]
            self.assertEqual(ex["image"].shape, labels.shape)
            # Every label survives resampling, cysts included.
            self.assertEqual(set(np.unique(labels)) - {0, 2}, {1, 3},
                             ex["case_id"])
            masses = labels[tuple(ex["tumour_coords"].T)]
            self.assertTrue(np.all((masses == 2) | (masses == 3)))
            self.assertIn(3, masses)  # cysts are oversampled as masses

    def test_split_keeps_kits19_test_cases_out_of_training(self):
        kits19_ids = [f"case_{i:05d}" for i in range(210)]
        from tfds_kits19.kits19 import kits19_dataset_builder as kits19

        _, kits19_test = kits19.split_case_ids(kits19_ids)
        ids = kits19_ids + [f"case_{i:05d}" for i in range(210, 300)] + [
            f"case_{i:05d}" for i in range(400, 589)]
        train, test = kits23_dataset_builder.split_case_ids(ids)
        self.assertFalse(set(kits19_test) & set(train))
        self.assertLessEqual(set(kits19_test), set(test))


if __name__ == "__main__":
    tfds.testing.test_main()
