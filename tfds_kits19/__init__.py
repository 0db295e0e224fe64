"""TFDS dataset builders of kits-keras; importing this registers ``kits19``
and ``kits23``.

>>> import tfds_kits19  # noqa: F401
>>> # tfds.load("kits19/coarse_3.22x1.62mm", data_dir=...)
"""

from tfds_kits19.kits19 import kits19_dataset_builder  # noqa: F401
from tfds_kits19.kits23 import kits23_dataset_builder  # noqa: F401
