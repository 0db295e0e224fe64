"""Summing the network's tile outputs into one probability volume.

:class:`Aggregator` is the accumulating half of
:func:`kits_keras.inference.sliding_window.sliding_window`: it adds each
tile's Gaussian-weighted, mirror-averaged probabilities into the padded
volume, normalises slabs of slices by the summed weights as soon as they
are final, and (with mirroring) accumulates the mirroring-disagreement map
on the QC grid of :func:`qc_view`. Pure NumPy.
"""

import numpy as np

from kits_keras.data.preprocessing import argmax_labels


class Aggregator:
    """Sums Gaussian-weighted tile probabilities over the padded volume and
    normalises every slab of slices as soon as no later tile reaches it.

    Fed one network output at a time, in order, from a single worker
    thread, so that the aggregation of one batch overlaps the network call
    of the next (NumPy and the backends release the GIL); the slab-wise
    normalisation leaves only the last row of tiles' slab for after the
    last network call.
    """

    def __init__(self, shape, gauss, num_flips, qc_shape, inverse_weight,
                 tiles, to_labels=None):
        self.shape, self.gauss, self.num_flips = shape, gauss, num_flips
        # Labels of one tile's channel maps, for the disagreement: the
        # argmax, or the region maps' rule (model.regions).
        self.to_labels = to_labels or argmax_labels
        # First slice of every tile, in feeding order.
        self.starts = [tile[0].start for tile in tiles]
        if self.starts != sorted(self.starts):
            # The slab-wise normalisation relies on this order.
            raise ValueError("tiles must come in order of their first slice")
        self.inverse_weight = inverse_weight
        self.accumulated = 0  # tiles summed so far
        self.normalised = 0  # slices of ``accum`` already normalised
        self.accum = self.weighted = None
        self.mean = self.first = self.differs = None
        self.disagree = self.qc_weight = None
        if qc_shape is not None:
            self.disagree = np.zeros(qc_shape, dtype=np.float32)
            self.qc_weight = np.zeros(qc_shape, dtype=np.float32)

    def add(self, group, flip, probs, qc_views):
        """``probs``: mirrored back, batch of tiles ``group`` (slices)."""
        if self.accum is None:
            channels = probs.shape[-1]
            self.accum = np.zeros(self.shape + (channels,), np.float32)
            self.weighted = np.empty(probs.shape[1:], np.float32)
            # The map repeated over classes: a multiply that broadcasts
            # over a last axis of 3 runs NumPy's inner loop 3 elements at a
            # time, about 4x slower than this flat one. The 1/num_flips of
            # the mirror average is folded in.
            self.gauss = np.repeat(self.gauss[..., None], channels, axis=-1)
            if self.num_flips > 1:
                self.gauss *= np.float32(1.0 / self.num_flips)
        if qc_views is not None:
            labels = [self.to_labels(list(np.moveaxis(probs[i][v[0]], -1,
                                                      0)))
                      for i, v in enumerate(qc_views)]
            if flip == 0:
                self.first = labels
                self.differs = [np.zeros(l.shape, bool) for l in labels]
            else:
                for d, l, f in zip(self.differs, labels, self.first):
                    d |= l != f
        if flip == 0:
            # Never write into the network's own output.
            self.mean = probs if self.num_flips == 1 else probs.copy()
        else:
            self.mean += probs
        if flip == self.num_flips - 1:
            self._accumulate(group, qc_views)
            self.accumulated += len(group)
            # Tiles come in order of their first slice: slices before the
            # next tile's first one are final.
            done = (self.starts[self.accumulated]
                    if self.accumulated < len(self.starts) else self.shape[0])
            self._normalise(done)

    def _accumulate(self, group, qc_views):
        for i, s in enumerate(group):
            np.multiply(self.mean[i], self.gauss, out=self.weighted)
            # ``a[s] += b`` would write the view back onto itself with
            # ``__setitem__``, a second pass over the tile.
            _add_into(self.accum[s], self.weighted)
            if qc_views is not None:
                inner, outer = qc_views[i]
                gauss = self.gauss[inner + (0,)]
                _add_into(self.disagree[outer], self.differs[i] * gauss)
                _add_into(self.qc_weight[outer], gauss)

    def _normalise(self, stop):
        """Divides slices ``[self.normalised, stop)`` by their weight sum."""
        if stop <= self.normalised:
            return
        z, y, x = self.inverse_weight
        weight = z[self.normalised:stop, None, None] * (y[:, None] * x)
        slab = self.accum[self.normalised:stop]
        for c in range(slab.shape[-1]):
            # Per class: broadcasting over a last axis of 3 is slower.
            view = slab[..., c]
            view *= weight
        self.normalised = stop


def _add_into(view, values):
    """``view += values`` in one pass (``view`` is a view into a larger
    array)."""
    np.add(view, values, out=view)


def qc_view(tile, origin):
    """Every 2nd voxel of a tile on the QC grid (voxels ``origin + 2k`` of
    the padded volume): the view into the tile and the slices of the QC
    accumulator it lands on."""
    inner, outer = [], []
    for s, o in zip(tile, origin):
        first = s.start + (o - s.start) % 2
        count = len(range(first, s.stop, 2))
        inner.append(slice(first - s.start, None, 2))
        outer.append(slice((first - o) // 2, (first - o) // 2 + count))
    return tuple(inner), tuple(outer)
