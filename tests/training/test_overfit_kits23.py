"""KiTS23 (4 labels) training: softmax and region-based training each
overfit one 4-class case, and prepare -> fit -> predict runs end to end.

The case is synthetic case 0 ("small") with a cyst painted in: a ball of
label 3 at 10 HU (fluid), radius 10 mm, in the kidney half away from the
tumour. Both modes train the tiny U-Net on the whole foreground box for
``epochs`` x ``steps`` steps and must reach Dice > 0.9 for each KiTS23 HEC
(kidney and masses, masses, tumour) on it.

Measured once each (shared 2-core CPU, 10 x 20 steps, lr 3e-3; ``python
tests/training/test_overfit_kits23.py overfit DIR MODE`` prints them):
softmax reached HEC Dice 0.9996 / 1.0 / 1.0 (kidney and masses, masses,
tumour; > 0.97 from epoch 6) in 3.5 min; regions 0.989 / 0.992 / 0.998
(> 0.9 from epoch 9-10) in 4 min. ``configs/kits23_paper.py`` takes its
default output mode from this.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def with_cyst(case, radius_mm=10.0, hu=10.0):
    """A copy of an :class:`kits_keras.io.Case` with a cyst (label 3,
    ``hu``) ball of ``radius_mm`` centred on the kidney voxel farthest from
    any tumour, kept inside kidney voxels."""
    import dataclasses

    from scipy import ndimage

    labels = case.labels.array.copy()
    image = case.image.array.copy()
    spacing = np.asarray(case.spacing)
    far = ndimage.distance_transform_edt(labels != 2, sampling=spacing)
    far[labels != 1] = -1
    centre = np.unravel_index(np.argmax(far), labels.shape)
    grid = np.indices(labels.shape)
    ball = sum(((g - c) * s) ** 2 for g, c, s in
               zip(grid, centre, spacing)) <= radius_mm ** 2
    cyst = ball & (labels == 1)
    labels[cyst] = 3
    image[cyst] = hu
    return dataclasses.replace(
        case, image=dataclasses.replace(case.image, array=image),
        labels=dataclasses.replace(case.labels, array=labels))


def overfit(run_dir, output_mode, epochs=10, steps=20):
    """Trains ``kits23_tiny`` with ``output_mode`` on one 4-class case and
    validates on the same foreground box (as ``test_fit.overfit``).

    Returns the per-epoch validation Dice of each HEC and the last one's.
    """
    from kits_keras.backend import select_backend

    select_backend("auto")
    import keras

    from kits_keras import config as config_lib
    from kits_keras.synthetic import cases as synthetic
    from tests.training.test_fit import train_on_one_case

    config = config_lib.override(
        config_lib.get_config("kits23_tiny"),
        model={"output_mode": output_mode},
        train={"epochs": epochs, "steps_per_epoch": steps,
               "learning_rate": 3e-3, "lr_schedule": "plateau",
               "lr_patience": 100, "batch_size": 1,
               "metric_smoothing": 1})
    history, _, y = train_on_one_case(
        config, with_cyst(synthetic.make_case(0, size="small")), run_dir,
        num_classes=4)
    names = ("kidney", "masses", "tumour")
    return {"backend": keras.backend.backend(), "mode": output_mode,
            "voxels": {int(v): int((y == v).sum()) for v in range(4)},
            "history": {n: [round(float(d), 4)
                            for d in history[f"val_{n}_dice"]]
                        for n in names},
            **{f"{n}_dice": float(history[f"val_{n}_dice"][-1])
               for n in names}}


def _run(tmp_path, mode):
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, __file__, "overfit", str(tmp_path / mode), mode],
        cwd=REPO, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.large  # ~100 training steps in a subprocess
@pytest.mark.parametrize("mode", ["softmax", "regions"])
def test_overfits_one_4_class_case(tmp_path, mode):
    result = _run(tmp_path, mode)
    # JSON keys are strings.
    assert result["voxels"]["3"] > 0, result  # the cyst survived resampling
    for name in ("kidney", "masses", "tumour"):
        assert result[f"{name}_dice"] > 0.9, result


def test_with_cyst_paints_label_3_inside_the_kidney():
    from kits_keras.synthetic import cases as synthetic

    case = synthetic.make_case(0, size="small")
    painted = with_cyst(case)
    new = painted.labels.array == 3
    assert new.any()
    assert np.all(case.labels.array[new] == 1)
    assert np.all(painted.image.array[new] == 10.0)
    assert not np.any(case.labels.array == 3)  # the input is untouched




def end_to_end(work_dir, output_mode):
    """prepare (kits23 builder on its dummy data) -> fit (2 steps) ->
    predict one dummy CT; returns what the test checks."""
    from kits_keras.backend import select_backend

    select_backend("auto")
    from kits_keras import artifact
    from kits_keras import config as config_lib
    from kits_keras import io
    from kits_keras.data import prepare
    from kits_keras.inference import predict
    from kits_keras.training import fit as training

    cases = os.path.join(REPO, "tfds_kits19", "kits23", "dummy_data")
    data_dir = os.path.join(work_dir, "tfds")
    config = config_lib.override(
        config_lib.get_config("kits23_tiny"),
        data={"patch_size": (16, 32, 32)},
        model={"output_mode": output_mode},
        train={"epochs": 1, "steps_per_epoch": 2})
    result = prepare.prepare(cases, data_dir, config.data)
    run = training.fit(config, data_dir, os.path.join(work_dir, "run"),
                       verbose=0)
    art = artifact.load_artifact(run)
    volume = io.read_image(os.path.join(cases, "case_00004",
                                        io.IMAGE_FILE))
    pred = predict.predict_case(volume, art.network, art.config, art.stats)
    return {"name": result.name, "examples": result.num_examples,
            "mode": art.config.model.output_mode,
            "channels": int(pred.probabilities.shape[-1]),
            "labels_subset": bool(set(np.unique(pred.labels).tolist())
                                  <= {0, 1, 2, 3}),
            "shape_ok": pred.labels.shape == volume.array.shape}


@pytest.mark.large  # a prepare, a compiled fit and a prediction
@pytest.mark.parametrize("mode,channels", [("softmax", 4), ("regions", 3)])
def test_prepare_fit_predict_kits23(tmp_path, mode, channels):
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, __file__, "end_to_end", str(tmp_path), mode],
        cwd=REPO, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"name": "kits23/demo_4.0x3.2mm",
                      "examples": {"train": 4, "test": 2}, "mode": mode,
                      "channels": channels, "labels_subset": True,
                      "shape_ok": True}, result


if __name__ == "__main__":
    if sys.argv[1:2] == ["overfit"]:
        print(json.dumps(overfit(sys.argv[2], sys.argv[3])))
    elif sys.argv[1:2] == ["end_to_end"]:
        print(json.dumps(end_to_end(sys.argv[2], sys.argv[3])))
