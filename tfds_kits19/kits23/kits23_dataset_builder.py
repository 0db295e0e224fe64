"""KiTS23 kidney, tumour and cyst CT, resampled and normalised, for TFDS.

A sibling of ``tfds_kits19/kits19`` that shares all its preprocessing code:
:class:`Builder` subclasses the kits19 builder and changes only what
differs (why a sibling rather than more kits19 configs: the kits19 configs
are target grids, and a dataset of another label set under the same name
would let a 3-class experiment silently train on 4 labels, or the reverse;
a ``kits23/<grid>`` dataset says what it holds):

* labels {0 background, 1 kidney, 2 tumour, 3 cyst}: each resampled as its
  own class (one-hot + argmax, :func:`kits_keras.data.preprocessing.
  resample_labels` with 4 classes); intensity statistics over label > 0 of
  the training split only, as for KiTS19;
* ``tumour_coords`` holds tumour **and cyst** voxels (the masses), so the
  pipeline's tumour oversampling (``data.tumour_fraction``) samples cysts
  too;
* split: a case whose **number** is 4 mod 5 is a test case
  (``case_00004``, ``case_00009``, ...). KiTS19's test cases (its 210
  labelled cases 0-209, index % 5 == 4, which for consecutive ids is the
  same rule) are thus test cases here as well: a model trained on this
  dataset never saw a KiTS19 test case, and one trained on KiTS19 never saw
  a KiTS23 test case among cases 0-209. KiTS23's ids have gaps (0-299,
  400-588), which is why the rule uses the number and not the position.

Layout: ``dataset/case_XXXXX/imaging.nii.gz`` + ``segmentation.nii.gz``
(the kits23 repository's ``dataset/`` folder), the KiTS19 layout.
"""

import dataclasses
import re

from kits_keras import config as kk_config
from tfds_kits19.kits19 import kits19_dataset_builder as kits19

BuilderConfig = kits19.BuilderConfig

MANUAL_DOWNLOAD_INSTRUCTIONS = """
Clone https://github.com/neheller/kits23, `pip install -e .` it and run
`kits23_download_data`. Pass its `dataset/` folder, which holds
`case_00000/ ... case_00588/` each with `imaging.nii.gz` and
`segmentation.nii.gz`, as `manual_dir` (`kits-keras prepare --manual-dir
kits23/dataset --config kits23_paper`).
"""

_CITATION = """
@article{heller2023kits21,
  title={The KiTS21 Challenge: Automatic segmentation of kidneys, renal
         tumors, and renal cysts in corticomedullary-phase CT},
  author={Heller, Nicholas and others},
  journal={arXiv preprint arXiv:2307.01984},
  year={2023}
}
"""

TEST_EVERY = kits19.TEST_EVERY
_CASE_NUMBER = re.compile(r"case_(\d+)$")


def split_case_ids(case_ids):
    """``(train_ids, test_ids)``, sorted: case number % 5 == 4 -> test.

    >>> split_case_ids(["case_00004", "case_00400", "case_00404"])
    (['case_00400'], ['case_00004', 'case_00404'])
    """
    train, test = [], []
    for case_id in sorted(case_ids):
        number = int(_CASE_NUMBER.match(case_id).group(1))
        (test if number % TEST_EVERY == TEST_EVERY - 1 else train).append(
            case_id)
    return train, test


def source_fingerprint(manual_dir, foreground_samples):
    """:func:`kits19.source_fingerprint`, this module's code included."""
    return kits19.source_fingerprint(manual_dir, foreground_samples,
                                     extra_sources=(__file__,))


class Builder(kits19.Builder):
    """DatasetBuilder for KiTS23 (one example per case, labels 0-3)."""

    VERSION = kits19.Builder.VERSION
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [dataclasses.replace(c)
                       for c in kits19.Builder.BUILDER_CONFIGS]
    LABEL_VALUES = kk_config.LABEL_SETS["kits23"]
    MASS_LABELS = (2, 3)
    SPLIT_RULE = "case number % 5 == 4 -> test (KiTS19's test cases too)"
    split_case_ids = staticmethod(split_case_ids)
    source_fingerprint = staticmethod(source_fingerprint)

    HOMEPAGE = "https://kits-challenge.org/kits23/"
    CITATION = _CITATION
