"""The paper's network on coarse 3.22 x 1.62 x 1.62 mm data.

About 8x fewer voxels than ``paper``: for quick experiments and CPU inference.
Run: ``kits-keras prepare --manual-dir DIR --config coarse`` then
``kits-keras fit --config coarse``.
"""

import dataclasses

from kits_keras.configs import paper


def get_config():
    base = paper.get_config()
    return dataclasses.replace(
        base,
        name="coarse",
        data=dataclasses.replace(
            base.data, dataset="coarse_3.22x1.62mm", patch_size=(48, 128, 128)
        ),
    )
