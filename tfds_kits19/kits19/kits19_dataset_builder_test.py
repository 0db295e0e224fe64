"""kits19 dataset builder test over the tiny cases in dummy_data/."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kits_keras.config import DataConfig
from tfds_kits19 import fingerprint
from tfds_kits19.kits19 import kits19_dataset_builder


DEMO = "demo_4.0x3.2mm"


class Kits19Test(tfds.testing.DatasetBuilderTestCase):
    """Builds the demo config from dummy_data/ (5 cases: 4 train, 1 test);
    :class:`Kits19OtherConfigsTest` (large) builds the finer ones, which
    differ only in the target spacing (~10x the voxels at 0.78 mm)."""

    DATASET_CLASS = kits19_dataset_builder.Builder
    SPLITS = {"train": 4, "test": 1}  # case_00004 is index 4 -> test
    SKIP_TF1_GRAPH_MODE = True
    BUILDER_CONFIG_NAMES_TO_TEST = [DEMO]

    def test_metadata(self):
        builder = self._make_builder(config=DEMO)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=self.dummy_data))
        meta = builder.info.metadata
        self.assertEqual(meta["test_case_ids"], ["case_00004"])
        self.assertEqual(len(meta["train_case_ids"]), 4)
        self.assertGreater(meta["intensity_stats"]["std"], 0)
        samples = DataConfig.foreground_samples  # the builder's default
        self.assertEqual(meta["foreground_samples"], samples)
        source = meta["source"]
        self.assertEqual(source, kits19_dataset_builder.source_fingerprint(
            self.dummy_data, samples))
        self.assertEqual(len(source["cases"]), 5)
        self.assertFalse(fingerprint.fingerprint_differences(
            source, source))
        for ex in tfds.as_numpy(builder.as_dataset(split="train")):
            self.assertEqual(ex["image"].shape, ex["labels"].shape)
            shape = np.asarray(ex["labels"].shape)
            self.assertTrue(np.all(ex["foreground_coords"] < shape))
            self.assertTrue(np.all(ex["labels"][tuple(
                ex["foreground_coords"].T)] > 0))


@pytest.mark.large
class Kits19OtherConfigsTest(Kits19Test):
    BUILDER_CONFIG_NAMES_TO_TEST = [
        c.name for c in kits19_dataset_builder.Builder.BUILDER_CONFIGS
        if c.name != DEMO]


if __name__ == "__main__":
    tfds.testing.test_main()
