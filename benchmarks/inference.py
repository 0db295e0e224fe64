"""Inference: sliding-window overhead, post-processing, memory, s/case.

Run from the repo root (about 31 min on a 2-core AVX2-only host, 19 of
them section 5; ``--sections 1,2`` runs a subset into the committed JSON)::

    python benchmarks/inference.py [--peers-python /work/peers-venv/bin/python]

1. Tiling-and-aggregation overhead, as in ``shared/peers/bench_sliding.py``:
   network Conv3d(1->8, k3) -> ReLU -> Conv3d(8->3, k1), a smooth synthetic
   (130, 256, 256) float32 volume, roi (48, 192, 192), overlap 0.5, Gaussian
   weighting, without and with 8x mirroring. overhead = total - time inside
   the network calls, as a share of the total (the peers' definition).
   Ours: :func:`kits_keras.inference.sliding_window.sliding_window` with the net
   in Keras (TensorFlow backend, the CPU default); the time inside our network
   callable is network time (its NumPy <-> tensor copies, which the
   peers' torch-only loops do not make, are reported apart as
   ``conversion_s``, and ``overhead_pct_incl_conversion`` counts them as
   overhead). Our aggregation of one batch runs in a worker
   thread while the network predicts the next, so part of it is hidden.
   MONAI: ``sliding_window_inference(sw_batch_size=2, mode="gaussian")``,
   mirroring in the predictor callable; nnU-Net: the real
   ``nnUNetPredictor`` (``manual_initialization`` with a minimal plans dict,
   ``predict_logits_from_preprocessed_data``, ``use_mirroring`` for TTA).
   One warm-up forward and one untimed full pass each, then the median of
   ``--repeats`` runs.
2. Post-processing on the real KiTS19 label volumes (``$KITS19_LABELS``):
   ours (:func:`kits_keras.inference.postprocess.postprocess`) vs nnU-Net v2
   ``remove_all_but_largest_component_from_segmentation(seg, [1, 2])``,
   MONAI ``KeepLargestConnectedComponent(applied_labels=[1, 2],
   independent=True)`` and the cc3d route (one multi-label
   ``connected_components`` + ``statistics``, largest per label), median of
   ``--repeats`` per case, one process per library.
3. Peak RSS of ``kits-keras infer`` (its own process, ``wait4``) on a
   synthetic 1059 x 512 x 512 CT (0.5 x 0.78 x 0.78 mm) with a tiny
   untrained U-Net at the coarse configuration (3.22 x 1.62 x 1.62 mm,
   patch 48 x 128 x 128), ``--tta none``.
4. Seconds per case of ``kits-keras infer`` for a synthetic 261-slice case
   (261 x 512 x 512, 1.0 x 0.94 x 0.94 mm) at the coarse configuration with
   ``--tta none`` and ``--tta flip``, with the tiny network (base 8, 4
   levels); the paper-size network (base 30, 5 levels) with ``--tta none``
   when ``--paper-network`` is given (several minutes on 2 cores).

5. What a case costs on CPU against nnU-Net, on both CPU kinds (native,
   and ``ONEDNN_MAX_CPU_ISA=AVX2``, the AVX2-only emulation): ``kits-keras
   infer --tta all`` (8 mirrorings) on the 261-slice case with the tiny
   network, and nnU-Net's ``nnUNetPredictor.predict_single_npy_array``
   (crop, resample, CT normalisation, Gaussian sliding window with step
   0.5 and 8 mirrorings, resampling back, argmax) on the same CT with a
   same-shape ``PlainConvUNet`` (random weights), the same target spacing,
   tile and intensity statistics. Ours is the per-case ``total`` of the
   infer JSON (read to written); nnU-Net's is from loading the NIfTI to
   the label array (no writing).

Summary: ``overhead_pct`` (ours, no TTA), ``overhead_pct_tta``,
``overhead_pct_incl_conversion`` (and ``_tta``), ``overhead_pct_monai``,
``overhead_pct_nnunet`` (and ``_tta``),
``postprocess_time_ratio_vs_cc3d`` (sum of our medians / sum of cc3d's over
the cases), ``peak_rss_gb_1059``, ``seconds_261_tta_none``,
``seconds_261_tta_flip``, ``seconds_261_tta_all_tiny`` (and ``_avx2``),
``nnunet_seconds_261_tta_all_tiny`` (and ``_avx2``),
``case_time_ratio_vs_nnunet`` (the worse kind's ours / nnU-Net).
"""

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

SHAPE = (130, 256, 256)
ROI = (48, 192, 192)
POST_CASES = ("case_00021", "case_00004", "case_00002", "case_00005")


def smooth_volume(path):
    """The (130, 256, 256) input: upsampled noise in [-1, 1], cached."""
    if os.path.exists(path):
        return path
    from scipy import ndimage

    rng = np.random.default_rng(0)
    small = rng.standard_normal([s // 8 for s in SHAPE]).astype(np.float32)
    big = ndimage.zoom(small, [s / t for s, t in zip(SHAPE, small.shape)],
                       order=1)[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    big = big / np.abs(big).max()
    np.save(path, np.ascontiguousarray(big, np.float32))
    return path


def _median_run(fn, repeats, counter):
    # One untimed pass first, on every side: allocators (TensorFlow's BFC,
    # PyTorch's, glibc's) grow to their working size during it.
    fn()
    totals, nets = [], []
    for _ in range(repeats):
        counter["net"] = 0.0
        start = time.perf_counter()
        fn()
        totals.append(time.perf_counter() - start)
        nets.append(counter["net"])
    i = int(np.argsort(totals)[len(totals) // 2])
    return {"median_index": i, "total_s": totals[i], "net_s": nets[i],
            "overhead_s": totals[i] - nets[i],
            "overhead_pct": 100 * (totals[i] - nets[i]) / totals[i],
            "totals_s": totals, "nets_s": nets}


def sliding_ours(volume_path, tta, repeats):
    """Ours: sliding_window around a Keras (TensorFlow) tiny net, with
    TensorFlow set up as ``--backend tensorflow`` sets it (oneDNN on x86
    CPUs with AVX2, :func:`kits_keras.backend.configure_tensorflow`)."""
    from kits_keras.backend import select_backend

    select_backend("tensorflow")
    import keras

    from kits_keras.inference import sliding_window as sw

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, None, 1))
    x = keras.layers.Conv3D(8, 3, padding="same", activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Conv3D(3, 1)(x))
    import tensorflow as tf

    counter = {"net": 0.0, "calls": 0, "conversion": 0.0}

    def network(batch):
        # The callable counts as network time (the peers time their
        # module's forward); the NumPy <-> tensor copies inside it are
        # recorded separately in ``conversion_s``. A mirrored batch arrives
        # as a flipped view: its copy is overhead, as the peers' torch.flip.
        batch = np.ascontiguousarray(batch)
        start = time.perf_counter()
        x = tf.convert_to_tensor(batch)
        mid = time.perf_counter()
        y = model(x, training=False)
        end = time.perf_counter()
        out = y.numpy()
        done = time.perf_counter()
        counter["net"] += done - start
        counter["conversion"] += (mid - start) + (done - end)
        counter["calls"] += 1
        return out

    image = np.load(volume_path)
    network(np.zeros((2,) + ROI + (1,), np.float32))  # warm-up
    conversions = []

    def once():
        counter["conversion"] = 0.0
        sw.sliding_window(image, network, ROI, 0.5, tta, 2)
        conversions.append(counter["conversion"])

    run = _median_run(once, repeats, counter)
    conversions = conversions[1:]  # not the warm-up pass
    median = conversions[run["median_index"]]
    run["conversion_pct"] = 100 * median / run["total_s"]
    run["overhead_pct_incl_conversion"] = (
        100 * (run["overhead_s"] + median) / run["total_s"])
    return {**run, "conversion_s": conversions,
            "backend": keras.backend.backend(), "sw_batch_size": 2}


def sliding_peer(volume_path, lib, tta, repeats):
    """MONAI or nnU-Net around the same tiny net in torch (peers env)."""
    import torch
    import torch.nn as nn

    torch.set_num_threads(2)
    counter = {"net": 0.0}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv3d(1, 8, 3, padding=1)
            self.c2 = nn.Conv3d(8, 3, 1)

        def forward(self, x):
            start = time.perf_counter()
            y = self.c2(torch.relu(self.c1(x)))
            counter["net"] += time.perf_counter() - start
            return y

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.from_numpy(np.load(volume_path))
    if lib == "monai":
        from monai.inferers import sliding_window_inference

        flips = [c for n in range(1, 4)
                 for c in itertools.combinations((2, 3, 4), n)]

        def predictor(t):
            p = net(t)
            if tta:
                for ax in flips:
                    p = p + torch.flip(net(torch.flip(t, ax)), ax)
                p = p / (len(flips) + 1)
            return p

        def fn():
            with torch.inference_mode():
                sliding_window_inference(x[None, None], ROI, 2, predictor,
                                         overlap=0.5, mode="gaussian")
    else:
        predictor = _nnunet_predictor(torch, net, tta)
        def fn():
            predictor.predict_logits_from_preprocessed_data(x[None])
    with torch.inference_mode():
        net(torch.zeros((1, 1) + ROI))
    return _median_run(fn, repeats, counter)


def _nnunet_predictor(torch, net, tta, patch=ROI, spacing=(3.0, 1.5, 1.5),
                      shape=SHAPE, intensity=None):
    """The real ``nnUNetPredictor`` around ``net`` with a minimal plans
    dict: tile ``patch``, target ``spacing`` (mm, z y x), CT normalisation
    with ``intensity`` (``{"mean", "std", "percentile_00_5",
    "percentile_99_5"}``) when given."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    resampling = {"is_seg": False, "order": 1, "order_z": 0,
                  "force_separate_z": None}
    plans = {
        "dataset_name": "Dataset999_Bench", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": list(shape),
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": (
            {"0": intensity} if intensity else {}),
        "configurations": {"3d_fullres": {
            "data_identifier": "bench", "preprocessor_name":
            "DefaultPreprocessor", "batch_size": 2, "patch_size": list(patch),
            "median_image_size_in_voxels": list(shape),
            "spacing": list(spacing),
            "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": resampling,
            "resampling_fn_seg_kwargs": {**resampling, "is_seg": True},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": resampling,
            "architecture": {"network_class_name": "tiny", "arch_kwargs": {},
                             "_kw_requires_import": []},
            "batch_dice": False,
        }},
    }
    manager = PlansManager(plans)
    dataset = {"labels": {"background": 0, "kidney": 1, "tumor": 2},
               "channel_names": {"0": "CT"}, "numTraining": 0,
               "file_ending": ".nii.gz"}
    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True,
                           use_mirroring=tta,
                           perform_everything_on_device=False,
                           device=torch.device("cpu"), verbose=False,
                           allow_tqdm=False)
    pred.manual_initialization(net, manager,
                               manager.get_configuration("3d_fullres"),
                               [net.state_dict()], dataset, "nnUNetTrainer",
                               (0, 1, 2))
    return pred


def whole_case_nnunet(ct_path, strides, features, spacing, patch, stats):
    """nnU-Net's whole case on CPU (peers env): seconds from loading the
    NIfTI to the label array, ``predict_single_npy_array`` with 8
    mirrorings around a same-shape ``PlainConvUNet``."""
    import nibabel as nib
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from torch import nn

    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = PlainConvUNet(
        input_channels=1, n_stages=len(features),
        features_per_stage=list(features), conv_op=nn.Conv3d, kernel_sizes=3,
        strides=[list(s) for s in strides], n_conv_per_stage=2,
        num_classes=3, n_conv_per_stage_decoder=2, conv_bias=True,
        norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5,
                                                   "affine": True},
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True,
                                            "negative_slope": 1e-2},
        deep_supervision=False).eval()
    intensity = {"mean": stats["mean"], "std": stats["std"],
                 "percentile_00_5": stats["clip_low"],
                 "percentile_99_5": stats["clip_high"]}
    start = time.perf_counter()
    img = nib.load(ct_path)
    # The file's array axes are (z, y, x) (KiTS19 layout), as nnU-Net's
    # SimpleITK reader would give them.
    data = np.asarray(img.dataobj, dtype=np.float32)[None]
    props = {"spacing": [float(v) for v in img.header.get_zooms()[:3]]}
    predictor = _nnunet_predictor(torch, net, True, patch=patch,
                                  spacing=spacing, shape=data.shape[1:],
                                  intensity=intensity)
    seg = predictor.predict_single_npy_array(data, props)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "shape": list(seg.shape),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}


def _load_labels(labels_dir, case):
    import nibabel as nib

    path = os.path.join(labels_dir, case, "segmentation.nii.gz")
    return np.asarray(nib.load(path).dataobj, dtype=np.uint8)


def postprocess_times(lib, labels_dir, cases, repeats):
    """Median seconds per case of one post-processing route."""
    if lib == "ours":
        from kits_keras.inference.postprocess import postprocess as fn_of
    elif lib == "nnunet":
        from nnunetv2.postprocessing.remove_connected_components import \
            remove_all_but_largest_component_from_segmentation as rm

        fn_of = lambda seg: rm(seg, [1, 2])  # noqa: E731
    elif lib == "monai":
        import torch
        from monai.transforms import KeepLargestConnectedComponent

        torch.set_num_threads(2)
        keep = KeepLargestConnectedComponent(
            applied_labels=[1, 2], is_onehot=False, independent=True,
            connectivity=None)
        fn_of = lambda seg: keep(torch.from_numpy(seg[None]))  # noqa: E731
    else:
        fn_of = _cc3d_keep_largest
    out = {}
    for case in cases:
        seg = _load_labels(labels_dir, case)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn_of(seg)
            times.append(time.perf_counter() - start)
        out[case] = {"median_s": statistics.median(times), "times_s": times,
                     "shape": list(seg.shape)}
    return out


def _cc3d_keep_largest(seg):
    import cc3d

    cc, n = cc3d.connected_components(seg, connectivity=26, return_N=True)
    stats = cc3d.statistics(cc)
    counts, best = stats["voxel_counts"], {}
    for cid in range(1, n + 1):
        box = stats["bounding_boxes"][cid]
        lab = int(seg[box][cc[box] == cid][0])
        if lab not in best or counts[cid] > counts[best[lab]]:
            best[lab] = cid
    keep = np.zeros(n + 1, dtype=np.uint8)
    keep[list(best.values())] = 1
    return seg * keep[cc]


def write_ct(path, shape, spacing):
    """A synthetic CT (int16 HU): body, two kidneys with a tumour."""
    from kits_keras import io
    from kits_keras.synthetic.cases import kits19_affine

    if os.path.exists(path):
        return path
    z, y, x = [(np.arange(n, dtype=np.float32) - n / 2) * s
               for n, s in zip(shape, spacing)]
    body = (y[:, None] / 140) ** 2 + (x[None, :] / 180) ** 2 < 1
    image = np.empty(shape, np.int16)
    for k in range(shape[0]):
        plane = np.where(body, 40, -1000).astype(np.int16)
        for cx in (-70.0, 70.0):
            r = ((z[k] / 60) ** 2 + ((y[:, None] - 30) / 30) ** 2
                 + ((x[None, :] - cx) / 28) ** 2)
            plane[r < 1] = 160
        image[k] = plane
    io.save_nifti(path, image, kits19_affine(spacing))
    return path


# The intensity statistics of the untrained benchmark networks (HU).
TINY_STATS = dict(clip_low=-80.0, clip_high=300.0, mean=100.0, std=75.0)


def tiny_coarse_artifact(run_dir, paper_network=False):
    """An untrained U-Net at the coarse config (tiny unless paper size)."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from kits_keras.artifact import save_artifact
    from kits_keras.config import get_config
    from kits_keras.config import override
    from kits_keras.model.unet import build_unet
    from kits_keras.data.intensity import IntensityStats

    path = os.path.join(run_dir, "model.keras")
    if os.path.exists(path):
        return path
    config = get_config("coarse")
    if not paper_network:
        tiny = get_config("tiny").model
        config = override(config, model={"num_levels": tiny.num_levels,
                                         "base_filters": tiny.base_filters,
                                         "max_filters": tiny.max_filters})
    config = override(config, infer={"batch_size": 2})
    stats = IntensityStats(**TINY_STATS)
    save_artifact(build_unet(config), config, stats, path)
    return path


def run_infer(args, extra_env=None):
    """``kits-keras infer ARGS`` in its own process: (seconds, peak RSS GB,
    the per-case report); ``extra_env`` is added to its environment."""
    import json

    code = "from cli.infer import infer; infer(prog_name='kits-keras infer')"
    # Output to a file, not a pipe: a full pipe would block the child.
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code, *args],
                                cwd=common.REPO,
                                env={**common.thread_env(2),
                                     **(extra_env or {})},
                                stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        log.seek(0)
        output = log.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"kits-keras infer {args} failed:\n{output[-3000:]}")
    seg = [a for a in args if a.endswith(".nii.gz") and "_pred" in a][0]
    with open(seg.replace(".nii.gz", ".json")) as fh:
        report = json.load(fh)
    return wall, usage.ru_maxrss / 1024**2, report


KINDS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"}}


def tiny_coarse_shape():
    """``(strides, features, spacing, patch)`` of the tiny network at the
    coarse config (what :func:`tiny_coarse_artifact` builds)."""
    from kits_keras.config import get_config
    from kits_keras.model.strides import model_strides
    from kits_keras.config import override

    tiny = get_config("tiny").model
    config = override(get_config("coarse"), model={
        "num_levels": tiny.num_levels, "base_filters": tiny.base_filters,
        "max_filters": tiny.max_filters})
    m = config.model
    features = [min(m.base_filters * 2**i, m.max_filters)
                for i in range(m.num_levels)]
    from kits_keras.config import DATASET_SPACINGS

    return ([list(s) for s in model_strides(config)], features,
            list(DATASET_SPACINGS[config.data.dataset]),
            list(config.data.patch_size))


def case_cost(args, here, ct_path, run_dir, summary):
    """Section 5: seconds per case, ``--tta all``, ours and nnU-Net's, on
    both CPU kinds; fills ``summary``."""
    strides, features, spacing, patch = tiny_coarse_shape()
    raw = {"strides": strides, "features": features, "spacing": spacing,
           "patch": patch}
    ratios = []
    for kind, extra in KINDS.items():
        suffix = "" if kind == "native" else f"_{kind}"
        out = os.path.join(args.work, f"ct_261_tiny_all_{kind}_pred.nii.gz")
        wall, rss, report = run_infer(
            [ct_path, "-o", out, "--model", run_dir, "--tta", "all",
             "--overwrite"], extra_env=extra)
        ours = report["timings_s"]["total"]
        raw[f"ours_{kind}"] = {"wall_s": wall, "peak_rss_gb": rss,
                               "seconds": ours,
                               "runtime": report.get("runtime")}
        summary[f"seconds_261_tta_all_tiny{suffix}"] = round(ours, 2)
        print(kind, "ours --tta all", round(ours, 1), "s", flush=True)
        if args.peers_python:
            res = common.call_in_subprocess(
                here, "whole_case_nnunet",
                {"ct_path": ct_path, "strides": strides,
                 "features": features, "spacing": spacing, "patch": patch,
                 "stats": TINY_STATS},
                python=args.peers_python, env=extra)
            peer = res["result"]["seconds"]
            raw[f"nnunet_{kind}"] = {**res["result"],
                                     "peak_rss_mb": res["peak_rss_mb"]}
            summary[f"nnunet_seconds_261_tta_all_tiny{suffix}"] = round(
                peer, 2)
            summary[f"case_time_ratio_vs_nnunet{suffix or '_native'}"] = (
                round(ours / peer, 3))
            ratios.append(ours / peer)
            print(kind, "nnU-Net", round(peer, 1), "s", flush=True)
    if ratios:
        summary["case_time_ratio_vs_nnunet"] = round(max(ratios), 3)
    return raw


def sliding_section(args, here, volume, raw, summary):
    """Section 1: tiling-and-aggregation overhead, ours and the peers."""
    # 1. Sliding-window overhead.
    sliding = {}
    for tta in (False, True):
        tag = "_tta" if tta else ""
        repeats = args.tta_repeats if tta else args.repeats
        res = common.call_in_subprocess(
            here, "sliding_ours", {"volume_path": volume,
                                   "tta": "all" if tta else "none",
                                   "repeats": repeats})
        sliding[f"ours{tag}"] = {**res["result"],
                                 "peak_rss_mb": res["peak_rss_mb"]}
        if args.peers_python:
            for lib in ("monai", "nnunet"):
                res = common.call_in_subprocess(
                    here, "sliding_peer", {"volume_path": volume, "lib": lib,
                                           "tta": tta,
                                           "repeats": repeats},
                    python=args.peers_python)
                sliding[f"{lib}{tag}"] = {**res["result"],
                                          "peak_rss_mb": res["peak_rss_mb"]}
        print({k: round(v["overhead_pct"], 1) for k, v in sliding.items()},
              flush=True)
    raw["sliding_window"] = sliding
    for key, value in sliding.items():
        name = key.replace("ours", "").replace("_tta", "")
        suffix = ("_" + name if name else "") + ("_tta" if "_tta" in key
                                                  else "")
        summary[f"overhead_pct{suffix}"] = round(value["overhead_pct"], 2)
        if "overhead_pct_incl_conversion" in value:
            summary[f"overhead_pct_incl_conversion{suffix}"] = round(
                value["overhead_pct_incl_conversion"], 2)


def postprocess_section(args, here, raw, summary):
    """Section 2: post-processing on the real KiTS19 label volumes."""
    # 2. Post-processing on the real label volumes.
    labels = common.labels_dir()
    cases = [c for c in POST_CASES if os.path.isdir(os.path.join(labels, c))]
    post = {}
    if cases:
        libs = ["ours"] + (["cc3d", "nnunet", "monai"]
                           if args.peers_python else [])
        for lib in libs:
            res = common.call_in_subprocess(
                here, "postprocess_times",
                {"lib": lib, "labels_dir": labels, "cases": cases,
                 "repeats": args.repeats},
                python=None if lib == "ours" else args.peers_python)
            post[lib] = res["result"]
            print(lib, {c: round(v["median_s"], 3)
                        for c, v in post[lib].items()}, flush=True)
        raw["postprocess"] = post
        totals = {lib: sum(v["median_s"] for v in r.values())
                  for lib, r in post.items()}
        raw["postprocess_total_s"] = totals
        if "cc3d" in totals:
            summary["postprocess_time_ratio_vs_cc3d"] = round(
                totals["ours"] / totals["cc3d"], 3)
        for lib in ("nnunet", "monai"):
            if lib in totals:
                summary[f"postprocess_time_ratio_vs_{lib}"] = round(
                    totals["ours"] / totals[lib], 3)


def infer_sections(args, here, run_dir, ct_261, raw, summary):
    """Sections 3 and 4: ``kits-keras infer``'s peak RSS at 1059 slices
    and seconds per case at 261."""
    ct_1059 = write_ct(os.path.join(args.work, "ct_1059.nii.gz"),
                       (1059, 512, 512), (0.5, 0.78, 0.78))
    out = os.path.join(args.work, "ct_1059_pred.nii.gz")
    wall, rss, report = run_infer([ct_1059, "-o", out, "--model", run_dir,
                                   "--tta", "none", "--overwrite"])
    raw["infer_1059"] = {"wall_s": wall, "peak_rss_gb": rss,
                         "report": report}
    summary["peak_rss_gb_1059"] = round(rss, 2)
    print("1059:", round(wall, 1), "s", round(rss, 2), "GB", flush=True)
    runs = {"tiny": run_dir}
    if args.paper_network:
        runs["paper"] = os.path.join(args.work, "run_paper_coarse")
        common.call_in_subprocess(here, "tiny_coarse_artifact",
                                  {"run_dir": runs["paper"],
                                   "paper_network": True})
    raw["infer_261"] = {}
    for net, run in runs.items():
        for tta in (("none", "flip") if net == "tiny" else ("none",)):
            out = os.path.join(args.work, f"ct_261_{net}_{tta}_pred.nii.gz")
            wall, rss, report = run_infer([ct_261, "-o", out, "--model", run,
                                           "--tta", tta, "--overwrite"])
            raw["infer_261"][f"{net}_{tta}"] = {
                "wall_s": wall, "peak_rss_gb": rss, "report": report}
            key = f"seconds_261_tta_{tta}" + ("" if net == "tiny"
                                              else "_paper_network")
            summary[key] = round(report["timings_s"]["total"], 2)
            summary[key.replace("seconds", "process_seconds")] = round(wall, 2)
            print(net, tta, round(wall, 1), "s", flush=True)
    raw["infer_network"] = ("tiny U-Net (4 levels, base 8, max 64) at the "
                            "coarse config, untrained")


SECTIONS = (1, 2, 3, 4, 5)


def merge_into_previous(raw, summary, sections):
    """``raw`` and ``summary`` of a partial rerun laid over the committed
    results (same keys replaced, the others kept), with a ``reruns`` list
    in ``raw`` saying which sections were rerun and when."""
    import datetime
    import json

    path = os.path.join(common.RESULTS_DIR, "inference.json")
    with open(path) as f:
        previous = json.load(f)
    merged_raw = {**previous["raw"], **raw}
    merged_raw["reruns"] = previous["raw"].get("reruns", []) + [{
        "sections": sorted(sections),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "first_run_date": previous.get("date")}]
    return merged_raw, {**previous["summary"], **summary}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers-python", default=common.default_peers_python())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tta-repeats", type=int, default=1,
                        help="Repeats of the 8x mirroring runs (each ~8x "
                        "longer).")
    parser.add_argument("--work", default=os.path.join(
        tempfile.gettempdir(), "kits_keras_bench_inference"))
    parser.add_argument("--paper-network", action="store_true")
    parser.add_argument("--sections", default=",".join(map(str, SECTIONS)),
                        help="Comma-separated sections to run (see the "
                        "module docstring). A subset replaces only their "
                        "figures in the existing results JSON, which "
                        "records which sections were rerun when.")
    args = parser.parse_args()
    try:
        sections = {int(x) for x in args.sections.split(",")}
    except ValueError:
        sections = set()
    if not sections or not sections <= set(SECTIONS):
        parser.error(f"--sections: a comma-separated subset of {SECTIONS}. "
                     f"Received: {args.sections!r}")
    os.makedirs(args.work, exist_ok=True)
    raw, summary = {}, {}
    here = os.path.abspath(__file__)
    volume = smooth_volume(os.path.join(args.work, "sw_130x256x256.npy"))

    if 1 in sections:
        sliding_section(args, here, volume, raw, summary)
    if 2 in sections:
        postprocess_section(args, here, raw, summary)
    run_dir = os.path.join(args.work, "run_tiny_coarse")
    ct_261 = os.path.join(args.work, "ct_261.nii.gz")
    if sections & {3, 4, 5}:
        common.call_in_subprocess(here, "tiny_coarse_artifact",
                                  {"run_dir": run_dir})
        write_ct(ct_261, (261, 512, 512), (1.0, 0.94, 0.94))
    if sections & {3, 4}:
        infer_sections(args, here, run_dir, ct_261, raw, summary)
    # 5. A whole case with 8 mirrorings on both CPU kinds, ours and nnU-Net.
    if 5 in sections:
        raw["case_cost"] = case_cost(args, here, ct_261, run_dir, summary)
    if sections != set(SECTIONS):
        raw, summary = merge_into_previous(raw, summary, sections)
    path = common.write_results("inference", {"raw": raw, "summary": summary},
                                peers_python=args.peers_python)
    print(path)
    print(summary)


if __name__ == "__main__":
    main()
