"""Resampling to (3.0, 1.5, 1.5) mm: kits-keras vs nnU-Net v2, same run.

Run from the repo root (about 5-8 min on 2 cores, most of it nnU-Net)::

    python benchmarks/preprocess.py [--peers-python /work/peers-venv/bin/python]

Cases: synthetic CT (``kits_keras.synthetic.cases.make_case``) around the real
KiTS19 labels of case_00021 (38 slices, 5 mm), case_00002 (261, 1 mm) and
case_00005 (834, 0.5 mm), generated once and cached as .npy
(``--cache``, default ``/tmp/kits_keras_bench_cache``) outside any timing.

Each (library, case) runs in its own process (``benchmarks.common``) that
loads image + labels, then times the image resampling and the label
resampling ``--repeats`` times (first call and median reported; peak RSS of
the process, inputs included). Ours: ``preprocessing.resample_image``
(linear, antialiased) and ``resample_labels`` (one-hot linear + argmax).
nnU-Net: ``resample_data_or_seg_to_shape`` called as its
``DefaultPreprocessor`` does (image order 3, labels one-hot order 1, order_z
0, separate-z decided by nnU-Net), like ``shared/peers/bench_resample.py``.

Fidelity, from the outputs of the timed calls: kidney and tumour volume (mL)
on the resampled grid vs the original; labels resampled down and back up to
the original grid with the same method, Dice vs the original labels; the
image resampled down and back up, mean absolute error (HU) in the kidney /
tumour region vs the original.

Summary: ``speedup_vs_nnunet`` = nnU-Net (image + labels, median) / ours on
the 834-slice case; ``peak_rss_gb_834`` = our process's peak RSS there.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

TARGET = (3.0, 1.5, 1.5)
CASES = ("case_00021", "case_00002", "case_00005")


def _paths(cache, case):
    return {k: os.path.join(cache, f"{case}_{k}.npy")
            for k in ("image", "labels", "spacing")}


def make_inputs(cache, case, labels_dir):
    """Synthetic CT around the real labels, cached (ours env)."""
    from kits_keras import io
    from kits_keras.synthetic import cases as synthetic

    paths = _paths(cache, case)
    if all(os.path.exists(p) for p in paths.values()):
        return "cached"
    labels = io.read_labels(os.path.join(labels_dir, case, io.LABELS_FILE))
    made = synthetic.make_case(0, labels=labels, case_id=case)
    os.makedirs(cache, exist_ok=True)
    np.save(paths["labels"], made.labels.array)
    np.save(paths["spacing"], np.asarray(made.spacing))
    np.save(paths["image"], made.image.array.astype(np.float32))
    return "made"


def _load(cache, case):
    p = _paths(cache, case)
    return (np.load(p["image"]), np.load(p["labels"]),
            tuple(float(s) for s in np.load(p["spacing"])))


def _time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def _resamplers(lib, spacing):
    """(image_fn(img, shape), labels_fn(lab, shape)) for a library."""
    if lib == "ours":
        from kits_keras.data import preprocessing as pp

        return (lambda img, shape, sp=spacing: pp.resample_image(
                    img, sp, shape=shape),
                lambda lab, shape, sp=spacing: pp.resample_labels(
                    lab, sp, shape=shape))
    from nnunetv2.preprocessing.resampling.default_resampling import (
        resample_data_or_seg_to_shape)

    def image_fn(img, shape, sp=spacing):
        new_sp = [s * n / m for s, n, m in zip(sp, img.shape, shape)]
        return resample_data_or_seg_to_shape(
            img[None], shape, sp, new_sp, is_seg=False, order=3, order_z=0,
            force_separate_z=None)[0]

    def labels_fn(lab, shape, sp=spacing):
        # nnU-Net's reader returns float32 segmentations
        new_sp = [s * n / m for s, n, m in zip(sp, lab.shape, shape)]
        return resample_data_or_seg_to_shape(
            lab[None].astype(np.float32), shape, sp, new_sp, is_seg=True,
            order=1, order_z=0, force_separate_z=None)[0]

    return image_fn, labels_fn


def measure(lib, cache, case, repeats):
    """Times image and label resampling of one case (runs in a child)."""
    image, labels, spacing = _load(cache, case)
    shape = tuple(max(1, int(round(n * s / t)))
                  for n, s, t in zip(image.shape, spacing, TARGET))
    image_fn, labels_fn = _resamplers(lib, spacing)
    img_times, img_out = _time(lambda: image_fn(image, shape), repeats)
    lab_times, lab_out = _time(lambda: labels_fn(labels, shape), repeats)
    np.save(os.path.join(cache, f"{case}_{lib}_image_down.npy"),
            np.asarray(img_out, np.float32))
    np.save(os.path.join(cache, f"{case}_{lib}_labels_down.npy"),
            np.asarray(lab_out).astype(np.uint8))
    return {"in_shape": list(image.shape), "out_shape": list(shape),
            "spacing": list(spacing), "image_s": img_times,
            "labels_s": lab_times}


def round_trip(lib, cache, case):
    """Resamples the downsampled outputs back to the original grid."""
    image, labels, spacing = _load(cache, case)
    down_img = np.load(os.path.join(cache, f"{case}_{lib}_image_down.npy"))
    down_lab = np.load(os.path.join(cache, f"{case}_{lib}_labels_down.npy"))
    down_sp = tuple(s * n / m for s, n, m in zip(spacing, image.shape,
                                                 down_img.shape))
    image_fn, labels_fn = _resamplers(lib, down_sp)
    up_img = image_fn(down_img, image.shape)
    up_lab = np.asarray(labels_fn(down_lab, image.shape)).astype(np.uint8)
    fg = labels > 0
    result = {"image_mae_hu_fg": float(np.abs(up_img[fg] - image[fg]).mean())}
    voxel = np.prod(spacing) / 1000.0
    down_voxel = np.prod(down_sp) / 1000.0
    for c, name in ((1, "kidney"), (2, "tumour")):
        a, b = labels == c, up_lab == c
        result[f"dice_round_trip_{name}"] = float(
            2 * (a & b).sum() / max(a.sum() + b.sum(), 1))
        result[f"{name}_ml_original"] = float(a.sum() * voxel)
        result[f"{name}_ml_resampled"] = float((down_lab == c).sum()
                                              * down_voxel)
        result[f"{name}_volume_error_pct"] = 100.0 * (
            result[f"{name}_ml_resampled"] / max(result[f"{name}_ml_original"],
                                                 1e-9) - 1.0)
    return result


def _median(xs):
    return float(np.median(xs))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers-python", default=common.default_peers_python())
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=os.environ.get(
        "KITS_BENCH_CACHE", "/tmp/kits_keras_bench_cache"))
    args = ap.parse_args()
    labels_dir = common.labels_dir()
    libs = {"ours": sys.executable}
    if args.peers_python:
        libs["nnunet"] = args.peers_python
    raw = {}
    for case in args.cases:
        print(f"{case}: inputs", common.call_in_subprocess(
            __file__, "make_inputs",
            dict(cache=args.cache, case=case, labels_dir=labels_dir),
            timeout=3600)["result"], flush=True)
        raw[case] = {}
        for lib, python in libs.items():
            res = common.call_in_subprocess(
                __file__, "measure", dict(lib=lib, cache=args.cache,
                                          case=case, repeats=args.repeats),
                python=python, threads=args.threads)
            entry = dict(res["result"], peak_rss_mb=res["peak_rss_mb"])
            entry.update(common.call_in_subprocess(
                __file__, "round_trip", dict(lib=lib, cache=args.cache,
                                             case=case),
                python=python, threads=args.threads)["result"])
            entry["image_plus_labels_median_s"] = (
                _median(entry["image_s"]) + _median(entry["labels_s"]))
            raw[case][lib] = entry
            print(f"{case} {lib}: image {entry['image_s']} s, labels "
                  f"{entry['labels_s']} s, peak {entry['peak_rss_mb']} MB",
                  flush=True)
    summary = {}
    big = "case_00005"
    if big in raw:
        ours = raw[big]["ours"]
        summary["peak_rss_gb_834"] = round(ours["peak_rss_mb"] / 1024, 2)
        summary["ours_image_plus_labels_s_834"] = round(
            ours["image_plus_labels_median_s"], 2)
        if "nnunet" in raw[big]:
            nn = raw[big]["nnunet"]
            summary["nnunet_image_plus_labels_s_834"] = round(
                nn["image_plus_labels_median_s"], 2)
            summary["speedup_vs_nnunet"] = round(
                nn["image_plus_labels_median_s"]
                / ours["image_plus_labels_median_s"], 2)
            summary["nnunet_peak_rss_gb_834"] = round(
                nn["peak_rss_mb"] / 1024, 2)
    for case, libs_res in raw.items():
        for lib, entry in libs_res.items():
            summary[f"{lib}_s_per_case_{case}"] = round(
                entry["image_plus_labels_median_s"], 2)
            for key in ("dice_round_trip_kidney", "dice_round_trip_tumour",
                        "kidney_volume_error_pct", "tumour_volume_error_pct",
                        "image_mae_hu_fg"):
                summary[f"{lib}_{key}_{case}"] = round(entry[key], 4)
    path = common.write_results("preprocess", {
        "target_spacing_mm": list(TARGET), "threads": args.threads,
        "repeats": args.repeats, "method": __doc__, "raw": raw,
        "summary": summary}, peers_python=args.peers_python)
    print(json.dumps(summary, indent=2))
    print("wrote", path)


if __name__ == "__main__":
    main()
