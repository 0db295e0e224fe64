"""Training-step benchmark: our U-Net on each Keras backend vs PyTorch.

CPU (default): the paper's architecture (30..320 features, 5 levels, four
deep-supervision heads) at batch 2, patch 48 x 96 x 96, float32, with the
strides nnU-Net plans for that patch ((1,1,1) (1,2,2) (2,2,2) (2,2,2)
(1,2,2), as the PyTorch peer). Each side runs in its own subprocess with the
same threads and the same input arrays; peak RSS is measured in the child:

* ``torch``: ``dynamic_network_architectures`` ``PlainConvUNet`` with deep
  supervision, eager, the same exponential-logarithmic loss ported to torch,
  ``torch.optim.Adam`` (runs in ``--peers-python``).
* ``tensorflow``: ``build_unet`` + ``ExpLogLoss`` per output with
  ``deep_supervision_weights`` via ``model.compile``; ``train_on_batch`` and
  ``predict_on_batch`` (``jit_compile=False``: TF's oneDNN kernels; the
  instance normalisations compiled by XLA in both, as ``fit`` and
  ``infer`` run them).
* ``tensorflow-xla``: the same with ``jit_compile=True`` (optional side).
* ``jax``: ``kits_keras.training.step.make_train_step`` (one jitted XLA
  program) and ``make_forward``; FLOPs from XLA's cost analysis.

A training step is forward + multi-scale loss + backward + Adam update.

Both CPU kinds in one run: every side runs ``native`` (this CPU as it is)
and ``avx2`` (``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN, in TensorFlow and in
PyTorch, limited to AVX2, as on an AVX2-only EPYC or Xeon). TensorFlow runs
twice per kind, with oneDNN (``tensorflow-onednn``) and with its Eigen
kernels (``tensorflow-eigen``, TensorFlow's own default on AVX2-only CPUs);
"ours" in the ``summary`` is the one ``--backend auto`` picks for that
kind (:func:`kits_keras.backend.tensorflow_onednn`), and the ratios without
a suffix are the worse of the two kinds. On a host without AVX-512 the
``avx2`` cap changes nothing: that kind is recorded as the native
measurement (``same_cpu_as``) instead of being run twice. The ``tiny`` experiment's step
(seconds and minor page faults per ``train_on_batch``) is measured the same
way, against a same-shape ``PlainConvUNet``.

GPU (``--gpu``, JAX only): paper config, bfloat16 mixed precision, batch 8,
48 x 192 x 192, synthetic device arrays; time per step, FLOPs per step from
cost analysis, achieved TFLOP/s. Its section is merged into the same JSON.
The full GPU check (PyTorch peer on the GPU, data parallel, inference,
numerics) is ``benchmarks/gpu_check.py``, which reuses this file's inputs,
torch network and torch loss.

Run: ``python benchmarks/train_step.py`` (about 25 min on 2 cores) or
``python benchmarks/train_step.py --gpu`` on a GPU host.
"""

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks import common  # noqa: E402
RESULT = os.path.join(REPO, "benchmarks", "results", "train_step.json")
PEER_STRIDES = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))
FEATURES = (30, 60, 120, 240, 320)
NUM_CLASSES = 3
# Exponential-logarithmic loss hyperparameters (LossConfig defaults).
LOSS = dict(w_dice=0.8, w_ce=0.2, gamma_dice=0.3, gamma_ce=0.3,
            class_weights=(1.0, 1.0, 2.0), smooth=1.0)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_inputs(batch, patch, strides=PEER_STRIDES):
    """The same random image and label pyramid for every side (numpy):
    labels at the resolution of each decoder output (the network's
    ``strides`` without the bottleneck's)."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *patch, 1), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, (batch, *patch)).astype(np.int32)
    factors, total = [], (1, 1, 1)
    for s in strides[:-1]:
        total = tuple(t * a for t, a in zip(total, s))
        factors.append(total)
    ys = [y[:, ::f[0], ::f[1], ::f[2]] for f in factors]
    return x, ys


def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, warmup, repeats, label):
    """Median seconds of ``fn`` after ``warmup`` calls, and the median
    number of minor page faults (fresh pages touched) per call."""
    times, faults = [], []
    for i in range(warmup + repeats):
        before = minor_faults()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        faults.append(minor_faults() - before)
        print(f"  {label} {i}: {times[-1]:.2f} s, {faults[-1]} faults",
              file=sys.stderr, flush=True)
    return dict(warmup=times[:warmup], times=times[warmup:],
                median=statistics.median(times[warmup:]),
                page_faults_median=statistics.median(faults[warmup:]))


def tiny_shape():
    """``(strides, features, patch)`` of the ``tiny`` experiment's U-Net."""
    from kits_keras.config import get_config
    from kits_keras.model.strides import model_strides

    cfg = get_config("tiny")
    m = cfg.model
    features = tuple(min(m.base_filters * 2**i, m.max_filters)
                     for i in range(m.num_levels))
    return (tuple(tuple(s) for s in model_strides(cfg)), features,
            tuple(cfg.data.patch_size))


# ----------------------------------------------------------------- torch
def torch_unet(strides=PEER_STRIDES, features=FEATURES,
               num_classes=NUM_CLASSES):
    """``dynamic_network_architectures``' ``PlainConvUNet`` as nnU-Net
    builds it, with deep supervision: our U-Net's architecture."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from torch import nn

    return PlainConvUNet(
        input_channels=1, n_stages=len(features),
        features_per_stage=list(features), conv_op=nn.Conv3d,
        kernel_sizes=3, strides=[list(s) for s in strides],
        n_conv_per_stage=2, num_classes=num_classes,
        n_conv_per_stage_decoder=2, conv_bias=True,
        norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5,
                                                   "affine": True},
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True,
                                            "negative_slope": 1e-2},
        deep_supervision=True)


def torch_multi_scale_loss(outputs, ys, num_classes=NUM_CLASSES):
    """kits_keras' multi-scale exponential-logarithmic loss in torch:
    ``outputs`` logits (B, C, z, y, x), full resolution first; ``ys``
    int64 labels at each output's resolution."""
    import torch
    import torch.nn.functional as F

    n = len(ys)
    ds_w = [0.5**i for i in range(n)]
    ds_w = [w / sum(ds_w) for w in ds_w]
    cw = torch.tensor(LOSS["class_weights"], device=outputs[0].device)

    def powe(t, g):
        return (t + 1e-6) ** g - 1e-6**g

    def exp_log(logits, y):  # the same loss as kits_keras.model.losses
        p = torch.softmax(logits.float(), 1).clamp(1e-7, 1.0)
        oh = F.one_hot(y, num_classes).permute(0, 4, 1, 2, 3).float()
        axes = (0, 2, 3, 4)
        dice = ((2 * (p * oh).sum(axes) + LOSS["smooth"])
                / (p.sum(axes) + oh.sum(axes) + LOSS["smooth"]))
        dice_t = powe((-torch.log(dice)).clamp_min(0),
                      LOSS["gamma_dice"]).mean()
        pt = (p * oh).sum(1)
        ce_t = (cw[y] * powe((-torch.log(pt)).clamp_min(0),
                             LOSS["gamma_ce"])).mean()
        return LOSS["w_dice"] * dice_t + LOSS["w_ce"] * ce_t

    return sum(w * exp_log(o, y) for w, o, y in zip(ds_w, outputs, ys))


def torch_worker(args):
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "tiny":
        strides, features, _ = tiny_shape()
    else:
        strides, features = PEER_STRIDES, FEATURES
    net = torch_unet(strides, features)
    opt = torch.optim.Adam(net.parameters(), lr=3e-4)
    x_np, ys_np = make_inputs(args.batch, args.patch, strides)
    x = torch.from_numpy(x_np[..., 0][:, None].copy())
    ys = [torch.from_numpy(y.astype(np.int64)) for y in ys_np]

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = torch_multi_scale_loss(net(x), ys)
        loss.backward()
        opt.step()
        return loss.item()

    def forward():
        with torch.inference_mode():
            net(x)

    import dynamic_network_architectures as dna

    res = dict(side="torch", torch=torch.__version__,
               dna=getattr(dna, "__version__", None),
               params=sum(p.numel() for p in net.parameters()),
               threads=torch.get_num_threads(),
               mkldnn=torch.backends.mkldnn.is_available())
    net.train()
    res["train"] = timed(train_step, args.warmup, args.repeats, "train")
    net.eval()  # InstanceNorm has no running stats: same numerics
    res["forward"] = timed(forward, args.warmup, args.repeats, "forward")
    return res


# ----------------------------------------------------------------- keras
def keras_model(patch, model="paper"):
    """The paper's U-Net with the peer's strides, or the ``tiny`` one."""
    from kits_keras.config import get_config
    from kits_keras.config import override
    from kits_keras.model.unet import build_unet

    if model == "tiny":
        # The peer's head: a softmax over KiTS19's three classes (tiny's
        # own is one sigmoid per region, two channels).
        cfg = override(get_config("tiny"), model={
            "strides": tiny_shape()[0], "output_mode": "softmax"})
    else:
        cfg = override(get_config("paper"), model={"strides": PEER_STRIDES},
                       data={"patch_size": tuple(patch)})
    return cfg, build_unet(cfg)


def tensorflow_worker(args):
    from kits_keras.backend import import_tensorflow

    tf = import_tensorflow()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    from kits_keras.model.losses import ExpLogLoss
    from kits_keras.model.losses import deep_supervision_weights

    from tensorflow.python.util import _pywrap_util_port

    keras.utils.set_random_seed(0)
    cfg, model = keras_model(args.patch, args.model)
    from kits_keras.model.strides import model_strides

    x, ys = make_inputs(args.batch, args.patch, model_strides(cfg))
    model.compile(
        optimizer=keras.optimizers.Adam(3e-4),
        loss=[ExpLogLoss.from_loss_config(cfg.loss)] * len(ys),
        loss_weights=deep_supervision_weights(len(ys)),
        jit_compile=args.side == "tensorflow-xla",
    )
    res = dict(side=args.side, keras=keras.__version__,
               tensorflow=tf.__version__, params=model.count_params(),
               jit_compile=args.side == "tensorflow-xla",
               onednn_in_force=bool(_pywrap_util_port.IsMklEnabled()),
               intra_op_threads=(
                   tf.config.threading.get_intra_op_parallelism_threads()),
               inter_op_threads=(
                   tf.config.threading.get_inter_op_parallelism_threads()))
    # As kits-keras infer runs it (Artifact.full_resolution): the
    # normalisations compiled by XLA at inference too.
    from kits_keras.model.layers import fuse_inference

    fuse_inference(model)
    res["fused_inference"] = True
    res["forward"] = timed(lambda: model.predict_on_batch(x), args.warmup,
                           args.repeats, "forward")
    res["train"] = timed(lambda: model.train_on_batch(x, ys), args.warmup,
                         args.repeats, "train")
    return res


def _cost_flops(compiled):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else None


def jax_worker(args, batch, patch, warmup, repeats, bfloat16=False):
    # The JAX side runs as on the GPU host: without TensorFlow (which Keras
    # would otherwise import for utilities, adding to the peak memory).
    sys.modules["tensorflow"] = None
    import jax
    import keras

    from kits_keras.config import get_config
    from kits_keras.model.unet import build_unet
    from kits_keras.model.unet import count_flops
    from kits_keras.training.step import make_forward
    from kits_keras.training.step import make_train_step

    if bfloat16:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    if args.gpu:
        cfg = get_config("paper")
        model = build_unet(cfg)
        import numpy as np

        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, *patch, 1), dtype=np.float32)
        y = rng.integers(0, NUM_CLASSES, (batch, *patch)).astype(np.int32)
        from kits_keras.model.strides import output_strides

        ys = [y[:, ::f[0], ::f[1], ::f[2]] for f in output_strides(cfg)]
    else:
        from kits_keras.model.strides import model_strides

        cfg, model = keras_model(patch, args.model)
        x, ys = make_inputs(batch, patch, model_strides(cfg))
    x, ys = jax.device_put(x), [jax.device_put(y) for y in ys]
    step, state = make_train_step(model, cfg.loss,
                                  keras.optimizers.Adam(3e-4))
    forward = make_forward(model)
    res = dict(side="jax", keras=keras.__version__, jax=jax.__version__,
               devices=[str(d) for d in jax.devices()],
               params=model.count_params(),
               dtype_policy=keras.mixed_precision.dtype_policy().name,
               analytic_forward_flops_per_sample=count_flops(
                   cfg, tuple(patch)))
    start = time.perf_counter()
    forward_c = forward.lower(state, x).compile()
    res["forward_compile_s"] = time.perf_counter() - start
    res["xla_forward_flops_batch"] = _cost_flops(forward_c)
    res["forward"] = timed(
        lambda: jax.block_until_ready(forward_c(state, x)), warmup, repeats,
        "forward")
    start = time.perf_counter()
    step_c = step.lower(state, x, ys).compile()
    res["train_compile_s"] = time.perf_counter() - start
    res["xla_train_flops_batch"] = _cost_flops(step_c)
    box = [state]

    def train():
        box[0], loss = step_c(box[0], x, ys)
        jax.block_until_ready(loss)

    res["train"] = timed(train, warmup, repeats, "train")
    if res["xla_train_flops_batch"]:
        res["train_tflops_per_s"] = (res["xla_train_flops_batch"]
                                     / res["train"]["median"] / 1e12)
    return res


def run_worker(args):
    if args.side == "torch":
        res = torch_worker(args)
    elif args.side.startswith("tensorflow"):
        res = tensorflow_worker(args)
    else:
        res = jax_worker(args, args.batch, args.patch, args.warmup,
                         args.repeats)
    res["peak_rss_mb"] = peak_rss_mb()
    with open(args.result, "w") as f:
        json.dump(res, f, indent=1)


# ---------------------------------------------------------------- parent
# The two CPU kinds: this CPU, and an AVX2-only one emulated by capping
# oneDNN's instruction set (TensorFlow's and PyTorch's).
KINDS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"}}
# TensorFlow's oneDNN switch per TensorFlow side.
TF_SIDES = {"tensorflow-onednn": "1", "tensorflow-eigen": "0",
            "tensorflow-xla": "1"}


def kind_flags(kind, flags):
    """The CPU flags the kernels see in ``kind``: without AVX-512, VNNI and
    AMX for ``avx2``."""
    if kind == "native":
        return frozenset(flags)
    return frozenset(f for f in flags
                     if not f.startswith(("avx512", "amx", "avx_vnni")))


def auto_side(kind, flags):
    """The TensorFlow side ``--backend auto`` runs on a ``kind`` CPU."""
    from kits_keras.backend import tensorflow_onednn

    enabled, _, why = tensorflow_onednn(kind_flags(kind, flags), {})
    return ("tensorflow-onednn" if enabled else "tensorflow-eigen"), why


def run_side(args, side, kind, model):
    python = args.peers_python if side == "torch" else sys.executable
    backend = "jax" if side == "jax" else "tensorflow"
    if model == "tiny":
        warmup, repeats, batch = args.tiny_warmup, args.tiny_repeats, 2
        from kits_keras.config import get_config

        patch = get_config("tiny").data.patch_size
    elif side == "jax":
        warmup, repeats = args.jax_warmup, args.jax_repeats
        batch, patch = args.batch, args.patch
    else:
        warmup, repeats, batch, patch = (args.warmup, args.repeats,
                                         args.batch, args.patch)
    env = dict(os.environ, KERAS_BACKEND=backend, OMP_NUM_THREADS=str(
        args.threads), MKL_NUM_THREADS=str(args.threads),
        JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2",
        **KINDS[kind])
    if side in TF_SIDES:
        env["TF_ENABLE_ONEDNN_OPTS"] = TF_SIDES[side]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [python, os.path.abspath(__file__), "--worker", "--side", side,
               "--model", model, "--result", out, "--batch", str(batch),
               "--threads", str(args.threads), "--warmup", str(warmup),
               "--repeats", str(repeats), "--patch",
               *[str(p) for p in patch]]
        print(f"[{kind} {model} {side}] {' '.join(cmd)}", file=sys.stderr,
              flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=None)
        if proc.returncode != 0 or not os.path.exists(out):
            return dict(side=side, error=f"exit {proc.returncode}",
                        stdout_tail=proc.stdout[-2000:])
        with open(out) as f:
            res = json.load(f)
        res["wall_s"] = time.perf_counter() - start
        res["env"] = {k: env[k] for k in ("ONEDNN_MAX_CPU_ISA",
                                          "TF_ENABLE_ONEDNN_OPTS",
                                          "OMP_NUM_THREADS") if k in env}
        return res


def versions():
    return common.package_versions(
        ("keras", "jax", "jaxlib", "tensorflow-cpu", "tensorflow", "optax",
         "numpy"))


write_json = common.write_json  # no nibabel needed: the GPU host has none


def _ratio(ours, torch, *keys):
    a, b = ours, torch
    for k in keys:
        a, b = a[k], b[k]
    return a / b


def summarise_kind(kind, sides, ours):
    """Ratios of the ``ours`` side (auto's choice) to torch, and every
    side's figures, for one CPU kind; keys end in ``_<kind>``."""
    paper, tiny = sides["paper"], sides["tiny"]
    torch = paper.get("torch", {})
    out = {}
    if "train" in torch and "train" in paper.get(ours, {}):
        out.update({
            f"cpu_train_time_ratio_vs_torch_{kind}": _ratio(
                paper[ours], torch, "train", "median"),
            f"cpu_forward_time_ratio_vs_torch_{kind}": _ratio(
                paper[ours], torch, "forward", "median"),
            f"cpu_peak_memory_ratio_vs_torch_{kind}": _ratio(
                paper[ours], torch, "peak_rss_mb"),
        })
    for model, by_side in (("paper", paper), ("tiny", tiny)):
        for side, v in by_side.items():
            if "train" not in v:
                continue
            key = f"{model}_{side}_{kind}"
            out[f"{key}_train_s"] = v["train"]["median"]
            out[f"{key}_forward_s"] = v["forward"]["median"]
            out[f"{key}_peak_rss_mb"] = v["peak_rss_mb"]
            if model == "tiny":
                out[f"{key}_train_page_faults_per_step"] = (
                    v["train"]["page_faults_median"])
    return out


def summarise(kinds):
    """The per-kind summaries and, without suffix, the worse kind's
    ratios (what holds on every x86 CPU)."""
    summary = {}
    for kind, entry in kinds.items():
        summary[f"auto_side_{kind}"] = entry["auto_side"]
        summary.update(summarise_kind(kind, entry["sides"],
                                      entry["auto_side"]))
    for name in ("cpu_train_time_ratio_vs_torch",
                 "cpu_forward_time_ratio_vs_torch",
                 "cpu_peak_memory_ratio_vs_torch"):
        values = [summary[f"{name}_{k}"] for k in kinds
                  if f"{name}_{k}" in summary]
        if values:
            summary[name] = max(values)
    return summary


def main_cpu(args):
    # No KERAS_BACKEND here: the package would take it for the user's
    # choice and ``auto_backend_on_this_host`` would echo it.
    sys.path.insert(0, REPO)
    from kits_keras.backend import cpu_flags
    from kits_keras.backend import resolve_backend
    from kits_keras.config import get_config
    from kits_keras.config import override
    from kits_keras.model.unet import count_flops

    cfg = override(get_config("paper"), model={"strides": PEER_STRIDES})
    flags = cpu_flags()
    kinds = {}
    for kind in args.kinds.split(","):
        side_auto, why = auto_side(kind, flags)
        kinds[kind] = dict(
            env=KINDS[kind], auto_side=side_auto, auto_why=why,
            flags_seen={f: f in kind_flags(kind, flags) for f in (
                "avx2", "avx512f", "avx512_vnni", "avx512_bf16",
                "amx_tile")})
        # On an AVX2-only host the emulation caps nothing: the kernels are
        # the native ones, so they are measured once and recorded for both.
        twin = next((k for k in kinds if k != kind and kind_flags(k, flags)
                     == kind_flags(kind, flags)), None)
        if twin:
            kinds[kind].update(sides=kinds[twin]["sides"], same_cpu_as=twin)
            continue
        kinds[kind]["sides"] = {
            model: {side: run_side(args, side, kind, model)
                    for side in args.sides.split(",")}
            for model in ("tiny", "paper")}
    flops = count_flops(cfg, tuple(args.patch))
    previous = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
    gpu = previous.get("gpu") if previous.get("gpu", {}).get("run") else {
        "run": False, "reason": "no GPU on the host of this CPU run; run "
        "`python benchmarks/train_step.py --gpu` on a GPU host"}
    summary = summarise(kinds)
    summary["gpu_run"] = bool(gpu.get("run"))
    strides, features, tiny_patch = tiny_shape()
    data = dict(
        benchmark="train_step", date=datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=common.machine_info(), versions=versions(),
        setup=dict(batch=args.batch, patch=list(args.patch),
                   threads=args.threads, strides=PEER_STRIDES,
                   features=FEATURES, dtype="float32",
                   loss="exponential-logarithmic, 4 deep-supervision heads",
                   optimizer="Adam 3e-4",
                   tiny=dict(batch=2, patch=list(tiny_patch),
                             strides=strides, features=features),
                   auto_backend_on_this_host=resolve_backend("auto")),
        analytic_forward_flops_per_sample=flops,
        analytic_train_flops_per_batch=3 * flops * args.batch,
        kinds=kinds, gpu=gpu, summary=summary)
    write_json(args.out, data)
    print(json.dumps(summary, indent=1))


def main_gpu(args):
    os.environ["KERAS_BACKEND"] = "jax"
    sys.path.insert(0, REPO)
    import jax

    if not any(d.platform != "cpu" for d in jax.devices()):
        raise SystemExit("--gpu: JAX sees no accelerator on this host")
    res = jax_worker(args, 8, (48, 192, 192), 2, 10, bfloat16=True)
    res.update(run=True, batch=8, patch=[48, 192, 192], dtype="bfloat16",
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds"), versions=versions())
    data = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            data = json.load(f)
    data["gpu"] = res
    data.setdefault("summary", {}).update(
        gpu_run=True, gpu_train_step_s=res["train"]["median"],
        gpu_train_tflops_per_s=res.get("train_tflops_per_s"),
        gpu_device=res["devices"][0])
    write_json(args.out, data)
    print(json.dumps(data["summary"], indent=1))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sides", default=("torch,tensorflow-onednn,"
                                       "tensorflow-eigen,jax"),
                   help="comma list of torch, tensorflow-onednn, "
                        "tensorflow-eigen, tensorflow-xla, jax")
    p.add_argument("--kinds", default="native,avx2",
                   help="comma list of CPU kinds: native, avx2")
    p.add_argument("--model", default="paper", choices=("paper", "tiny"),
                   help=argparse.SUPPRESS)
    p.add_argument("--tiny-warmup", type=int, default=3)
    p.add_argument("--tiny-repeats", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--patch", type=int, nargs=3, default=[48, 96, 96])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    # The JAX step is compiled ahead of time, so no warm-up is needed.
    p.add_argument("--jax-warmup", type=int, default=0)
    p.add_argument("--jax-repeats", type=int, default=2)
    p.add_argument("--peers-python", default=os.environ.get(
        "KITS_PEERS_PYTHON", "/work/peers-venv/bin/python"))
    p.add_argument("--out", default=RESULT)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    args = parse_args()
    if args.worker:
        if args.side != "torch":
            # What the kits-keras command does first on a CPU-only host.
            from kits_keras import backend

            backend.tune_allocator()
        run_worker(args)
    elif args.gpu:
        main_gpu(args)
    else:
        main_cpu(args)
