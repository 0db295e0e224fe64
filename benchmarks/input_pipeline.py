"""Augmented training patches per second: kits-keras vs batchgenerators/MONAI.

Task (as ``shared/peers/bench_aug.py``): one (130, 256, 256) volume (smooth
synthetic image, real KiTS19 labels of case_00002 nearest-resampled to that
shape when ``$KITS19_LABELS`` is there, else synthetic ellipsoids) in memory;
each step gives one augmented (48, 192, 192) image patch and its labels:
random crop, rotation about all three axes (+-15 deg), scaling (0.85-1.25),
elastic deformation (alpha 0-900, sigma 9-13), gamma (0.7-1.5, stats
retained), mirroring (0.5 per axis).

* ours: ``kits_keras.data.pipeline.patch_dataset`` (the training pipeline:
  tf.data, parallel map, one resampling from the whole volume, trilinear image /
  nearest labels, plus the label pyramid) on the volume stored as float16 as
  TFDS stores it. Run on both cores, and pinned to one core (per-core rate).
* bg_v1: batchgenerators SpatialTransform(rot+scale+elastic, cubic image,
  per-label linear labels) + GammaTransform + MirrorTransform with nnU-Net
  v1's parameters (nnU-Net v1's pipeline).
* monai: RandSpatialCropd + RandAffined + Rand3DElasticd +
  RandAdjustContrastd + RandFlipd x3 (bilinear / nearest).

Probabilities: ``nnunet`` = nnU-Net v1's (rotation, scale, elastic 0.2 each,
gamma 0.3; MONAI's RandAffined gets P(rot or scale) = 0.36) and ``all``
(every op on every patch). Peers run in the peers env with 2 threads, one
process, as in the peers README. Each measurement runs in its own process
for ``--seconds`` after one warm-up patch.

Also reported: the rate a GPU training step needs (``--batch`` patches every
``--step-seconds``; default 8 per 0.25 s = 32 patches/s) and the cores our
pipeline needs for it (needed rate / our one-core rate; and needed rate x
CPU seconds per patch, which other processes on the machine disturb less).
The machine's load average at start and end is recorded: on a shared
machine every rate drops, compare ratios measured in the same run.

Run: ``/work/venv/bin/python benchmarks/input_pipeline.py`` (about 7 min;
writes ``benchmarks/results/input_pipeline.json``).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
from benchmarks import common  # noqa: E402

SHAPE = (130, 256, 256)
ROI = (48, 192, 192)
SPACING = (3.0, 0.78, 0.78)
PROBS = {
    "nnunet": {"rot": 0.2, "scale": 0.2, "el": 0.2, "gamma": 0.3},
    "all": {"rot": 1.0, "scale": 1.0, "el": 1.0, "gamma": 1.0},
}


def make_source(path, labels_dir):
    """Writes the shared source volume (image float32, labels uint8)."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    small = rng.standard_normal([s // 8 for s in SHAPE]).astype(np.float32)
    image = ndimage.zoom(small, [s / t for s, t in zip(SHAPE, small.shape)],
                         order=1)[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    image = (image - image.mean()) / image.std()
    seg = os.path.join(labels_dir, "case_00002", "segmentation.nii.gz")
    if os.path.exists(seg):
        import nibabel as nib

        lab = np.asarray(nib.load(seg).dataobj, dtype=np.uint8)
        labels = ndimage.zoom(
            lab, [s / t for s, t in zip(SHAPE, lab.shape)], order=0)
        source = "case_00002 labels, nearest-resampled"
    else:
        zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE],
                                 indexing="ij")
        labels = np.zeros(SHAPE, np.uint8)
        for side in (-0.45, 0.45):
            labels[(zz / 0.5) ** 2 + ((yy - 0.1) / 0.2) ** 2
                   + ((xx - side) / 0.15) ** 2 < 1] = 1
        labels[zz ** 2 / 0.04 + (yy - 0.1) ** 2 / 0.004
               + (xx - 0.45) ** 2 / 0.004 < 1] = 2
        source = "synthetic ellipsoid kidneys"
    assert image.shape == labels.shape == SHAPE
    np.savez(path, image=image.astype(np.float32), labels=labels)
    return source


def _timed(step, seconds):
    """Runs ``step`` once (warm-up), then for ``seconds``; rate and stats."""
    step()
    times = []
    cpu0 = time.process_time()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    return {
        "patches": len(times),
        "elapsed_s": round(elapsed, 2),
        "patches_per_s": round(len(times) / elapsed, 3),
        "median_s_between_patches": round(float(np.median(times)), 4),
        "p90_s_between_patches": round(float(np.percentile(times, 90)), 4),
        # CPU seconds (all threads) per patch: less sensitive than the rate
        # to other processes sharing the machine.
        "cpu_s_per_patch": round(cpu / max(len(times), 1), 4),
    }


def measure_ours(source, probs, seconds, cores=0):
    """kits-keras training pipeline; ``cores`` > 0 pins to that many."""
    if cores:
        # Before TensorFlow starts: its thread pools follow the affinity.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    from kits_keras import config as config_lib
    from kits_keras.data import pipeline as data

    tf = data.tf
    p = PROBS[probs]
    cfg = config_lib.override(
        config_lib.get_config("paper"),
        data={"patch_size": ROI, "foreground_fraction": 0.0},
        augment={"p_rotation": p["rot"], "p_scale": p["scale"],
                 "p_elastic": p["el"], "p_gamma": p["gamma"]},
    )
    arrays = np.load(source)
    labels = arrays["labels"]
    volume = {
        "image": arrays["image"].astype(np.float16),  # as TFDS stores it
        "labels": labels,
        "spacing": np.array(SPACING, np.float32),
        "foreground_coords": np.argwhere(labels > 0)[:10000].astype(
            np.int32),
        "tumour_coords": np.argwhere(labels == 2)[:10000].astype(np.int32),
    }
    volumes = tf.data.Dataset.from_tensors(volume)
    it = iter(data.patch_dataset(volumes, cfg, seed=0, training=True))
    first = next(it)
    result = _timed(lambda: next(it), seconds)
    result["patch_shape"] = list(first[0].shape)
    result["label_shapes"] = [list(t.shape) for t in first[1]]
    result["cores"] = len(os.sched_getaffinity(0))
    return result


def measure_bg_v1(source, probs, seconds):
    """batchgenerators v1 as nnU-Net v1 configures it (peers env)."""
    import torch
    from batchgenerators.transforms.abstract_transforms import Compose
    from batchgenerators.transforms.color_transforms import GammaTransform
    from batchgenerators.transforms.spatial_transforms import MirrorTransform
    from batchgenerators.transforms.spatial_transforms import SpatialTransform

    torch.set_num_threads(2)
    np.random.seed(0)
    arrays = np.load(source)
    p = PROBS[probs]
    deg15 = np.radians(15.0)
    transform = Compose([
        SpatialTransform(
            ROI, patch_center_dist_from_border=[s // 2 for s in ROI],
            do_elastic_deform=True, alpha=(0.0, 900.0), sigma=(9.0, 13.0),
            do_rotation=True, angle_x=(-deg15, deg15),
            angle_y=(-deg15, deg15), angle_z=(-deg15, deg15),
            p_rot_per_axis=1, do_scale=True, scale=(0.85, 1.25),
            border_mode_data="constant", border_cval_data=0, order_data=3,
            border_mode_seg="constant", border_cval_seg=-1, order_seg=1,
            random_crop=True, p_el_per_sample=p["el"],
            p_scale_per_sample=p["scale"], p_rot_per_sample=p["rot"],
            independent_scale_for_each_axis=False),
        GammaTransform((0.7, 1.5), invert_image=False, per_channel=True,
                       retain_stats=True, p_per_sample=p["gamma"]),
        MirrorTransform((0, 1, 2)),
    ])
    image = arrays["image"][None, None]
    seg = arrays["labels"][None, None].astype(np.float32)
    result = _timed(lambda: transform(data=image, seg=seg), seconds)
    result["threads"] = torch.get_num_threads()
    return result


def measure_monai(source, probs, seconds):
    """MONAI dictionary transforms, bilinear image / nearest labels."""
    import torch
    from monai.transforms import Compose
    from monai.transforms import Rand3DElasticd
    from monai.transforms import RandAdjustContrastd
    from monai.transforms import RandAffined
    from monai.transforms import RandFlipd
    from monai.transforms import RandSpatialCropd

    torch.set_num_threads(2)
    arrays = np.load(source)
    p = PROBS[probs]
    deg15 = np.radians(15.0)
    keys = ["image", "label"]
    p_affine = 1 - (1 - p["rot"]) * (1 - p["scale"])
    transform = Compose([
        RandSpatialCropd(keys, roi_size=ROI, random_size=False),
        RandAffined(keys, prob=p_affine, rotate_range=[(-deg15, deg15)] * 3,
                    scale_range=[(-0.15, 0.25)] * 3,
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        Rand3DElasticd(keys, sigma_range=(9, 13), magnitude_range=(0, 900),
                       prob=p["el"], mode=("bilinear", "nearest"),
                       padding_mode="zeros"),
        RandAdjustContrastd("image", prob=p["gamma"], gamma=(0.7, 1.5),
                            retain_stats=True),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys, prob=0.5, spatial_axis=2),
    ])
    transform.set_random_state(seed=0)
    sample = {"image": torch.from_numpy(arrays["image"][None].copy()),
              "label": torch.from_numpy(arrays["labels"][None].copy())}
    result = _timed(lambda: transform(sample), seconds)
    result["threads"] = torch.get_num_threads()
    result["p_affine"] = round(p_affine, 3)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--peers-python",
                        default=common.default_peers_python())
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--step-seconds", type=float, default=0.25)
    args = parser.parse_args()
    raw = {}
    load = {"start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="kits_input_") as tmp:
        source = os.path.join(tmp, "source.npz")
        source_note = make_source(source, common.labels_dir())
        runs = []
        for probs in PROBS:
            runs.append((f"ours_{probs}", sys.executable, "measure_ours",
                         {"probs": probs}))
            runs.append((f"ours_1core_{probs}", sys.executable,
                         "measure_ours", {"probs": probs, "cores": 1}))
            if args.peers_python:
                for lib in ("bg_v1", "monai"):
                    runs.append((f"{lib}_{probs}", args.peers_python,
                                 f"measure_{lib}", {"probs": probs}))
        for name, python, func, kwargs in runs:
            kwargs = dict(kwargs, source=source, seconds=args.seconds)
            res = common.call_in_subprocess(__file__, func, kwargs,
                                            python=python, threads=2)
            raw[name] = dict(res["result"], peak_rss_mb=res["peak_rss_mb"])
            print(name, raw[name]["patches_per_s"], "patches/s", flush=True)
    load["end"] = os.getloadavg()
    needed = args.batch / args.step_seconds
    summary = {"gpu_step_needs_patches_per_s": needed}
    by_probs = {}
    for probs in PROBS:
        ours = raw[f"ours_{probs}"]["patches_per_s"]
        per_core = raw[f"ours_1core_{probs}"]["patches_per_s"]
        summary[f"ours_patches_per_s_{probs}"] = ours
        summary[f"ours_patches_per_s_per_core_{probs}"] = per_core
        summary[f"cores_needed_for_gpu_step_{probs}"] = round(
            needed / per_core, 1)
        # The same from CPU seconds per patch (one-core run): robust when
        # other processes share the machine; equal to the above when quiet.
        summary[f"cores_needed_for_gpu_step_cpu_time_{probs}"] = round(
            needed * raw[f"ours_1core_{probs}"]["cpu_s_per_patch"], 1)
        peers = {lib: raw[f"{lib}_{probs}"]["patches_per_s"]
                 for lib in ("bg_v1", "monai") if f"{lib}_{probs}" in raw}
        for lib, rate in peers.items():
            summary[f"{lib}_patches_per_s_{probs}"] = rate
            summary[f"speedup_vs_{lib}_{probs}"] = round(ours / rate, 2)
        if peers:
            by_probs[probs] = round(ours / max(peers.values()), 2)
    if by_probs:
        # Headline: the smaller of the two probability settings.
        summary["speedup_vs_fastest_peer"] = min(by_probs.values())
        summary["speedup_vs_fastest_peer_by_probs"] = by_probs
    payload = {
        "task": {"source_shape": SHAPE, "patch": ROI, "spacing_mm": SPACING,
                 "labels": source_note, "probabilities": PROBS,
                 "seconds_per_measurement": args.seconds,
                 "gpu_step": {"batch": args.batch,
                              "seconds": args.step_seconds}},
        "load_average": load,
        "raw": raw,
        "summary": summary,
    }
    path = common.write_results("input_pipeline", payload,
                                peers_python=args.peers_python)
    print(path)


if __name__ == "__main__":
    main()
