"""The Python entry point: load a model once, segment many CTs.

``kits-keras infer`` and :class:`Segmenter` share every step
(:func:`kits_keras.inference.predict.segment_volume`: preprocessing, sliding
window, back to the input's grid, post-processing), so both give the same
labels, bit for bit.

Example (a tiny untrained model, so the labels mean nothing):

>>> import numpy as np, tempfile
>>> from kits_keras.artifact import save_artifact
>>> from kits_keras.config import get_config
>>> from kits_keras.model.unet import build_unet
>>> from kits_keras.data.intensity import IntensityStats
>>> run = tempfile.mkdtemp()
>>> config = get_config("tiny")
>>> _ = save_artifact(build_unet(config), config,
...                   IntensityStats(-100.0, 300.0, 100.0, 80.0),
...                   run + "/model.keras")
>>> seg = Segmenter.load(run, tta="none")
>>> ct = np.full((16, 48, 48), -1000.0, np.float32)   # (z, y, x) HU
>>> result = seg((ct, (3.0, 2.0, 2.0), np.diag([-2.0, -2.0, 3.0, 1.0])))
>>> result.labels.shape, result.labels.dtype
((16, 48, 48), dtype('uint8'))
>>> sorted(result.volumes_ml)
['kidney_and_tumour_ml', 'kidney_ml', 'tumour_ml']
>>> path = result.save(tempfile.mkdtemp() + "/seg.nii.gz")
>>> page = result.save_report(tempfile.mkdtemp() + "/report.html")
"""

import dataclasses
import os

import numpy as np

from kits_keras import io
from kits_keras import nifti_checks


@dataclasses.dataclass(frozen=True)
class Result:
    """One segmentation.

    Attributes:
        labels: uint8 array in {0, 1, 2} (background, kidney, tumour) on
            the input's grid: for a file, folder or nibabel image in the
            model's orientation (``volume.array``'s axes); for an
            ``(array, spacing, affine)`` input, the array's own axes.
        volumes_ml: dict. ``kidney_ml``, ``tumour_ml``,
            ``kidney_and_tumour_ml`` (a KiTS23 model, 4 classes: also
            ``cyst_ml``, ``kidney_and_masses_ml``).
        qc: dict. The quality-control report (mirroring disagreement,
            ``flagged``, ...), as in ``kits-keras infer``'s JSON.
        volume: :class:`kits_keras.io.Volume`. The CT as read.
        series: :class:`kits_keras.dicom.read.Series` for a DICOM input, else
            None.
        model: str. The model file or export that made it ("" when
            unknown).
    """

    labels: np.ndarray
    volumes_ml: dict
    qc: dict
    volume: object
    series: object = None
    model: str = ""

    def save_report(self, path, case_id=None):
        """Writes a self-contained HTML review page (atomic; returns
        ``path``): QC status, volumes per kidney, axial, coronal and
        sagittal views through each kidney and the largest tumour
        (:func:`kits_keras.report.write_case_report`). ``case_id``
        defaults to the input's file name."""
        from kits_keras import report

        return report.write_case_report(path, self, case_id=case_id)

    def save(self, path):
        """Writes the labels on the input's grid.

        ``.nii``/``.nii.gz``: NIfTI in the input file's layout (a DICOM
        series: dcm2niix's). ``.dcm``: a DICOM SEG referencing the source
        series (DICOM inputs only). Atomic; returns ``path``.
        """
        path = os.fspath(path)
        if path.endswith(".dcm"):
            if self.series is None:
                raise ValueError(f"{path}: a DICOM SEG needs a DICOM series "
                                 "input")
            from kits_keras.dicom import write as dicom_write

            return dicom_write.save_seg(path, self.labels, self.volume,
                                        self.series)
        if not io.is_nifti(path):
            raise ValueError(f"{path}: give a .nii.gz, .nii or .dcm path")
        return io.save_like(path, self.labels, self.volume)


class Segmenter:
    """A loaded model; call it on CTs.

    Use :meth:`load`. Calling it takes a NIfTI path, a folder of one DICOM
    series, a nibabel image, or ``(array, spacing, affine)`` with a
    ``(z, y, x)`` HU array in the model's orientation (KiTS19's: axis 0
    head to feet), spacing in mm ``(z, y, x)`` and the 4x4 affine to save
    it with.
    """

    def __init__(self, artifact, config):
        from kits_keras.artifact import orientation_of

        self.artifact = artifact
        self.config = config
        self.orientation = orientation_of(artifact.metadata, artifact.path)

    @classmethod
    def load(cls, model=None, saved_model=None, postprocess=True, **infer):
        """Loads a run folder, ``.keras`` file or ``kits-keras export``
        folder (a folder holding ``saved_model.pb``, or given as
        ``saved_model``).

        Args:
            model: str, list of str, or None. None: the latest finished
                run under ``$KITS_KERAS_RUNS`` or ``./runs``. Several: their
                ensemble, probabilities averaged
                (:class:`kits_keras.inference.ensemble.Ensemble`).
            saved_model: str or None. An export to run instead.
            postprocess: bool. Connected-component clean-up. Defaults to
                True.
            **infer: :class:`kits_keras.config.InferenceConfig` fields to
                change (``tta``, ``overlap``, ``batch_size``).
        """
        from kits_keras.inference.batch import load_model
        from kits_keras.config import override

        art = load_model(model, saved_model)
        changes = {k: v for k, v in infer.items() if v is not None}
        config = override(art.config, infer=changes) if changes else (
            art.config)
        segmenter = cls(art, config)
        segmenter.postprocess = postprocess
        return segmenter

    postprocess = True

    def read(self, source):
        """``(Volume, Series or None)`` of any accepted input."""
        if isinstance(source, tuple):
            array, spacing, affine = source
            array = np.asarray(array, np.float32)
            if array.ndim != 3 or len(spacing) != 3:
                raise ValueError("Expected ((z, y, x) array, (z, y, x) "
                                 f"spacing, 4x4 affine). Received: shape "
                                 f"{array.shape}, spacing {spacing}")
            return io.Volume(array, tuple(float(s) for s in spacing),
                             np.asarray(affine, np.float64)), None
        if hasattr(source, "affine") and hasattr(source, "dataobj"):
            return _from_nibabel(source, self.orientation), None
        path = os.fspath(source)
        if os.path.isdir(path):
            from kits_keras.dicom import read as dicom

            series, errors = dicom.find_series(path)
            if errors:
                raise io.CaseError(errors[0])
            if len(series) != 1:
                raise io.CaseError(f"{path}: {len(series)} DICOM series; "
                                   "pass a folder of one")
            return dicom.read_series(series[0], self.orientation), series[0]
        return io.read_image(path, self.orientation), None

    def __call__(self, source, progress=None):
        """Segments one CT; returns a :class:`Result`."""
        from kits_keras.inference import predict

        volume, series = self.read(source)
        labels, pred, _, _ = predict.segment_volume(
            volume, self.artifact.network, self.config, self.artifact.stats,
            self.postprocess, progress)
        volumes = io.label_volumes_ml(labels, volume.spacing,
                                      self.config.model.num_classes)
        return Result(labels, volumes, pred.qc, volume, series,
                      str(self.artifact.path))


def _from_nibabel(image, orientation):
    """A nibabel image as a reoriented float32 HU :class:`Volume` (what
    :func:`kits_keras.io.read_image` gives for its file)."""
    affine = np.asarray(image.affine, np.float64)
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    spacing = nifti_checks.check_geometry("nibabel image", affine, data.shape)
    volume = io.oriented_volume(data, spacing, affine, image.header,
                                orientation, dtype=np.float32)
    if not np.all(np.isfinite(volume.array)):
        raise io.CaseError("nibabel image: non-finite intensities")
    return volume
