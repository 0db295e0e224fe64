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
  ``predict_on_batch`` (``jit_compile=False``: TF's oneDNN kernels).
* ``tensorflow-xla``: the same with ``jit_compile=True`` (optional side).
* ``jax``: ``kits_keras.training.step.make_train_step`` (one jitted XLA
  program) and ``make_forward``; FLOPs from XLA's cost analysis.

A training step is forward + multi-scale loss + backward + Adam update.

GPU (``--gpu``, JAX only): paper config, bfloat16 mixed precision, batch 8,
48 x 192 x 192, synthetic device arrays; time per step, FLOPs per step from
cost analysis, achieved TFLOP/s. Its section is merged into the same JSON.
The full GPU check (PyTorch peer on the GPU, data parallel, inference,
numerics) is ``benchmarks/gpu_check.py``, which reuses this file's inputs,
torch network and torch loss.

Run: ``python benchmarks/train_step.py`` (about 10-15 min on 2 cores) or
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


def timed(fn, warmup, repeats, label):
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        print(f"  {label} {i}: {times[-1]:.2f} s", file=sys.stderr, flush=True)
    return dict(warmup=times[:warmup], times=times[warmup:],
                median=statistics.median(times[warmup:]))


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
    net = torch_unet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-4)
    x_np, ys_np = make_inputs(args.batch, args.patch)
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
               threads=torch.get_num_threads())
    net.train()
    res["train"] = timed(train_step, args.warmup, args.repeats, "train")
    net.eval()  # InstanceNorm has no running stats: same numerics
    res["forward"] = timed(forward, args.warmup, args.repeats, "forward")
    return res


# ----------------------------------------------------------------- keras
def keras_model(patch):
    from kits_keras.config import get_config
    from kits_keras.config import override
    from kits_keras.model.unet import build_unet

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

    keras.utils.set_random_seed(0)
    cfg, model = keras_model(args.patch)
    x, ys = make_inputs(args.batch, args.patch)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-4),
        loss=[ExpLogLoss.from_loss_config(cfg.loss)] * len(ys),
        loss_weights=deep_supervision_weights(len(ys)),
        jit_compile=args.side == "tensorflow-xla",
    )
    res = dict(side=args.side, keras=keras.__version__,
               tensorflow=tf.__version__, params=model.count_params(),
               jit_compile=args.side == "tensorflow-xla")
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
        from kits_keras.config import output_strides

        ys = [y[:, ::f[0], ::f[1], ::f[2]] for f in output_strides(cfg)]
    else:
        cfg, model = keras_model(patch)
        x, ys = make_inputs(batch, patch)
    x, ys = jax.device_put(x), [jax.device_put(y) for y in ys]
    step, state = make_train_step(model, cfg.loss,
                                  keras.optimizers.Adam(3e-4))
    forward = make_forward(model)
    res = dict(side="jax", keras=keras.__version__, jax=jax.__version__,
               devices=[str(d) for d in jax.devices()],
               params=model.count_params(),
               dtype_policy=keras.mixed_precision.dtype_policy().name,
               analytic_forward_flops_per_sample=count_flops(cfg, patch))
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
def run_side(args, side):
    python = args.peers_python if side == "torch" else sys.executable
    backend = "jax" if side == "jax" else "tensorflow"
    warmup, repeats = ((args.jax_warmup, args.jax_repeats) if side == "jax"
                       else (args.warmup, args.repeats))
    env = dict(os.environ, KERAS_BACKEND=backend, OMP_NUM_THREADS=str(
        args.threads), MKL_NUM_THREADS=str(args.threads),
        JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [python, os.path.abspath(__file__), "--worker", "--side", side,
               "--result", out, "--batch", str(args.batch),
               "--threads", str(args.threads), "--warmup", str(warmup),
               "--repeats", str(repeats), "--patch",
               *[str(p) for p in args.patch]]
        print(f"[{side}] {' '.join(cmd)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=None)
        if proc.returncode != 0 or not os.path.exists(out):
            return dict(side=side, error=f"exit {proc.returncode}",
                        stdout_tail=proc.stdout[-2000:])
        with open(out) as f:
            res = json.load(f)
        res["wall_s"] = time.perf_counter() - start
        return res


def versions():
    return common.package_versions(
        ("keras", "jax", "jaxlib", "tensorflow-cpu", "tensorflow", "optax",
         "numpy"))


write_json = common.write_json  # no nibabel needed: the GPU host has none


def summarise(sides):
    torch = sides.get("torch", {})
    ours = {k: v for k, v in sides.items()
            if k != "torch" and "train" in v}
    summary = {}
    if not ours or "train" not in torch:
        return summary
    best = min(ours, key=lambda k: ours[k]["train"]["median"])
    t_train, t_fwd = torch["train"]["median"], torch["forward"]["median"]
    summary.update(
        best_backend=best,
        cpu_train_time_ratio_vs_torch=ours[best]["train"]["median"] / t_train,
        cpu_forward_time_ratio_vs_torch=(ours[best]["forward"]["median"]
                                         / t_fwd),
        cpu_peak_memory_ratio_vs_torch=(ours[best]["peak_rss_mb"]
                                        / torch["peak_rss_mb"]),
        torch_train_s=t_train, torch_forward_s=t_fwd,
        torch_peak_rss_mb=torch["peak_rss_mb"])
    for k, v in ours.items():
        summary[f"{k}_train_s"] = v["train"]["median"]
        summary[f"{k}_forward_s"] = v["forward"]["median"]
        summary[f"{k}_peak_rss_mb"] = v["peak_rss_mb"]
        summary[f"{k}_train_ratio_vs_torch"] = v["train"]["median"] / t_train
        summary[f"{k}_forward_ratio_vs_torch"] = (v["forward"]["median"]
                                                  / t_fwd)
        summary[f"{k}_memory_ratio_vs_torch"] = (v["peak_rss_mb"]
                                                 / torch["peak_rss_mb"])
    return summary


def main_cpu(args):
    # No KERAS_BACKEND here: the package would take it for the user's
    # choice and ``auto_backend_on_this_host`` would echo it.
    sys.path.insert(0, REPO)
    from kits_keras.backend import resolve_backend
    from kits_keras.config import get_config
    from kits_keras.config import override
    from kits_keras.model.unet import count_flops

    cfg = override(get_config("paper"), model={"strides": PEER_STRIDES})
    sides = {side: run_side(args, side) for side in args.sides.split(",")}
    flops = count_flops(cfg, tuple(args.patch))
    previous = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
    gpu = previous.get("gpu") if previous.get("gpu", {}).get("run") else {
        "run": False, "reason": "no GPU on the host of this CPU run; run "
        "`python benchmarks/train_step.py --gpu` on a GPU host"}
    summary = summarise(sides)
    summary["gpu_run"] = bool(gpu.get("run"))
    data = dict(
        benchmark="train_step", date=datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=common.machine_info(), versions=versions(),
        setup=dict(batch=args.batch, patch=list(args.patch),
                   threads=args.threads, strides=PEER_STRIDES,
                   features=FEATURES, dtype="float32",
                   loss="exponential-logarithmic, 4 deep-supervision heads",
                   optimizer="Adam 3e-4",
                   auto_backend_on_this_host=resolve_backend("auto")),
        analytic_forward_flops_per_sample=flops,
        analytic_train_flops_per_batch=3 * flops * args.batch,
        sides=sides, gpu=gpu, summary=summary)
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
    p.add_argument("--sides", default="torch,tensorflow,jax",
                   help="comma list of torch, tensorflow, tensorflow-xla, "
                        "jax")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--patch", type=int, nargs=3, default=[48, 96, 96])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
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
        run_worker(args)
    elif args.gpu:
        main_gpu(args)
    else:
        main_cpu(args)
