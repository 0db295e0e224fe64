"""One-shot GPU check: training step, PyTorch peer, data parallel,
inference and numerics in one command and one JSON.

Written for a GPU host that is lent briefly (one H200, about 15 minutes,
JAX + Keras + carried wheels, no TensorFlow, no nibabel, no registry):
``docs/gpu.md`` says how to run it there and how to read the result.

Sections, each in its own subprocess (so that one failing or being killed
at the time limit loses only itself, and so that JAX and PyTorch never hold
the GPU's memory at once), in order of importance:

1. ``jax`` (Keras 3 on JAX, TensorFlow and nibabel made unimportable):

   * ``train``: the paper's network and loss, ``mixed_bfloat16``, batch 8,
     48 x 192 x 192, Adam; :func:`kits_keras.training.step.make_train_step`
     compiled ahead of time: compile seconds, median seconds per step over
     ``steps`` steps (after ``warmup``), FLOPs per step from XLA's cost
     analysis and analytically (3 x :func:`kits_keras.model.unet.count_flops`
     per sample: forward, and backward w.r.t. inputs and weights), achieved
     TFLOP/s (analytic FLOPs / median step) and its share of 790 TFLOP/s
     (the dense bf16 matrix rate measured on this H200 kind), peak device
     memory, and every timed step's loss finite.
   * ``data_parallel``: ``keras.distribution.DataParallel`` over every local
     device, the model compiled as ``kits-keras fit`` compiles it
     (:func:`kits_keras.training.fit.compile_model`): the first
     ``train_on_batch`` loss equals the plain step's first loss (same
     weights, same batch) within ``DP_RTOL``.
   * ``inference``: :func:`kits_keras.inference.predict.predict_case`
     (resampling to the config's spacing, sliding window, resampling back, body
     mask) with the network of :class:`kits_keras.artifact.Artifact` on a
     synthetic 261 x 512 x 512 CT (1.0 x 0.94 x 0.94 mm), ``--tta none`` and
     ``all``, float32 as ``kits-keras infer`` runs: seconds per case,
     tiles/s (tile passes, mirrored ones included, per sliding-window
     second) and the share of the case's time outside the network.
   * ``numerics``: loss and global gradient norm of one batch under bfloat16
     and float32 from the same weights: relative differences within
     ``LOSS_RTOL`` and ``GRAD_NORM_RTOL``.

2. ``torch``: ``dynamic_network_architectures``' ``PlainConvUNet`` with
   deep supervision (the same architecture, strides and loss, from
   ``benchmarks/train_step.py``), Adam, bf16 autocast: eager, then
   ``torch.compile`` if it works there and time is left. Seconds per step
   and peak memory. Skipped, with the reason, where torch or the package
   is missing.
3. ``max_batch``: the largest batch that fits: the compiled step's memory
   at batch 8 (XLA's memory analysis), extrapolated linearly to the
   device's memory (:func:`largest_batch_estimate`), then that batch
   compiled and run for two steps (stepping down 10 % on an out-of-memory
   error). ``largest_batch_run`` is a batch that ran, within ~10 % of the
   largest.

The JSON (``benchmarks/results/gpu.json`` by default) is rewritten after
every section, so a run stopped at its limit keeps what it measured. Its
``summary`` holds ``gpu_train_s_per_step_bf16_b8``, ``gpu_tflops_achieved``,
``gpu_mfu_pct``, ``gpu_train_time_ratio_vs_torch``,
``gpu_infer_s_per_case_tta_all`` and ``gpu_peak_mem_gb``, and ``goals`` the
issue's targets (<= 0.25 s/step, >= 30 % of bf16 peak, no slower than
PyTorch) with whether each was met.

``--smoke`` runs the same code at toy sizes (the tiny network with 4..8
features, 16 x 32 x 32 patches, a 24 x 40 x 40 case, data parallel over two
virtual CPU devices) on the CPU in under a minute; CI runs it
(``tests/benchmarks/test_gpu_check.py``).

Run: ``python benchmarks/gpu_check.py`` (GPU host, about 7 minutes) or
``python benchmarks/gpu_check.py --smoke --out /tmp/gpu_smoke.json``.
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks import common  # noqa: E402

RESULT = os.path.join(common.RESULTS_DIR, "gpu.json")
PEAK_BF16_TFLOPS = 790.0  # dense bf16 matmul measured on this H200 kind
GOAL_S_PER_STEP = 0.25  # ~700 x 250 iterations in < 12 h
GOAL_MFU_PCT = 30.0
DP_RTOL = 2e-3
LOSS_RTOL = 0.02
GRAD_NORM_RTOL = 0.05
SECTIONS = ("jax", "torch", "max_batch")
GB = 1024.0**3


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one mode measures (``gpu``: the real check; ``smoke``: CI)."""

    config: str = "paper"
    model: tuple = ()  # (field, value) overrides of config.model
    patch: tuple = (48, 192, 192)
    batch: int = 8
    warmup: int = 2
    steps: int = 20
    case_shape: tuple = (261, 512, 512)
    case_spacing: tuple = (1.0, 0.94, 0.94)
    # Device memory for the largest-batch estimate when the device does not
    # report one (CPU), and the most batch to try (keeps CPU runs small).
    memory_limit_gb: float = None
    max_batch_cap: int = 4096
    time_limit_s: float = 420.0
    needs_accelerator: bool = True
    # Share of the time limit after which each section starts no new part.
    soft_deadlines: tuple = (("jax", 0.55), ("torch", 0.75),
                             ("max_batch", 1.0))


MODES = {
    "gpu": Sizes(),
    # The paper's softmax head, as the GPU run measures (tiny's own is a
    # region head).
    "smoke": Sizes(config="tiny", model=(("base_filters", 4),
                                         ("max_filters", 8),
                                         ("output_mode", "softmax")),
                   patch=(16, 32, 32), batch=2, warmup=1, steps=2,
                   case_shape=(24, 40, 40), case_spacing=(2.0, 1.6, 1.6),
                   memory_limit_gb=0.1, max_batch_cap=2, time_limit_s=150.0,
                   needs_accelerator=False),
}


def experiment(sizes):
    """The experiment config of ``sizes`` (its patch for training and for
    the sliding window)."""
    from kits_keras.config import get_config
    from kits_keras.config import override

    return override(get_config(sizes.config), model=dict(sizes.model),
                    data={"patch_size": tuple(sizes.patch)})


# ------------------------------------------------------------ jax section
def _block_host_only_packages():
    # As on the GPU host: neither TensorFlow nor nibabel may be imported on
    # the compute path (None in sys.modules makes ``import`` fail).
    for name in ("tensorflow", "nibabel", "tensorflow_datasets"):
        sys.modules[name] = None


def _cost_flops(compiled):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else None


def _memory_bytes(compiled):
    """Device bytes a compiled program needs (arguments, outputs and
    temporaries, less donated buffers reused for outputs)."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    total = (m.argument_size_in_bytes + m.output_size_in_bytes
             + m.temp_size_in_bytes - m.alias_size_in_bytes)
    return int(total + getattr(m, "generated_code_size_in_bytes", 0))


def _device_memory(jax):
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use"), stats.get("bytes_limit")


def _inputs(jax, cfg, batch):
    from benchmarks.train_step import make_inputs
    from kits_keras.model.strides import model_strides

    x, ys = make_inputs(batch, cfg.data.patch_size, model_strides(cfg))
    return x, ys


def _train(sizes, res):
    import jax
    import keras
    import numpy as np

    from kits_keras.model.unet import build_unet
    from kits_keras.model.unet import count_flops
    from kits_keras.training.step import make_train_step

    cfg = experiment(sizes)
    keras.config.set_dtype_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    model = build_unet(cfg)
    initial = model.get_weights()  # the step donates the variables' buffers
    x_np, ys_np = _inputs(jax, cfg, sizes.batch)
    x, ys = jax.device_put(x_np), [jax.device_put(y) for y in ys_np]
    step, state = make_train_step(model, cfg.loss,
                                  keras.optimizers.Adam(3e-4),
                                  output_mode=cfg.model.output_mode,
                                  label_set=cfg.data.label_set)
    start = time.perf_counter()
    compiled = step.lower(state, x, ys).compile()
    out = dict(compile_s=time.perf_counter() - start, batch=sizes.batch,
               patch=list(cfg.data.patch_size), dtype_policy="mixed_bfloat16",
               params=model.count_params(),
               xla_flops_per_step=_cost_flops(compiled),
               compiled_step_bytes=_memory_bytes(compiled),
               analytic_flops_per_step=3 * count_flops(
                   cfg, cfg.data.patch_size) * sizes.batch)
    box, losses, times = [state], [], []
    for _ in range(sizes.warmup + sizes.steps):
        t0 = time.perf_counter()
        box[0], loss = compiled(box[0], x, ys)
        losses.append(float(jax.block_until_ready(loss)))
        times.append(time.perf_counter() - t0)
    timed = times[sizes.warmup:]
    median = statistics.median(timed)
    tflops = out["analytic_flops_per_step"] / median / 1e12
    peak, limit = _device_memory(jax)
    out["state_bytes"] = sum(int(a.nbytes) for a in jax.tree.leaves(state))
    out.update(
        first_loss=losses[0], losses=losses, warmup_s=times[:sizes.warmup],
        step_s=timed, median_s_per_step=median,
        all_losses_finite=bool(np.all(np.isfinite(losses))),
        tflops_achieved=tflops,
        xla_tflops_achieved=(out["xla_flops_per_step"] / median / 1e12
                             if out["xla_flops_per_step"] else None),
        mfu_pct=100.0 * tflops / PEAK_BF16_TFLOPS,
        peak_mem_gb=peak / GB if peak is not None else None,
        device_memory_limit_gb=limit / GB if limit is not None else None)
    res["train"] = out
    return cfg, initial, (x_np, ys_np)


def _data_parallel(cfg, initial, batch, train, res):
    import jax
    import keras

    from kits_keras.model.unet import build_unet
    from kits_keras.training import distribute
    from kits_keras.training import fit as training

    devices = jax.local_devices()
    names = [f"{d.platform}:{d.id}" for d in devices]
    distribution = keras.distribution.DataParallel(devices=names)
    keras.config.set_dtype_policy("mixed_bfloat16")
    keras.distribution.set_distribution(distribution)
    try:
        model = build_unet(cfg)
        model.set_weights(initial)
        training.compile_model(model, cfg)
        x, ys = batch
        start = time.perf_counter()
        logs = model.train_on_batch(x, ys, return_dict=True)
        first_s = time.perf_counter() - start
        shards = distribute.describe_sharding(distribution, x.shape)
        weights_on = sorted(
            map(str, model.trainable_weights[0].value.sharding.device_set))
    finally:
        keras.distribution.set_distribution(None)
    loss, plain = float(logs["loss"]), train["first_loss"]
    rel = abs(loss - plain) / abs(plain)
    res["data_parallel"] = dict(
        devices=names, batch_sharding=shards, weights_on=weights_on,
        loss=loss, plain_step_loss=plain, rel_diff=rel, rtol=DP_RTOL,
        same_loss=bool(rel <= DP_RTOL), first_call_s=first_s)


def synthetic_ct(shape, spacing):
    """An int16 CT in HU: air, a body ellipse, two kidneys with a brighter
    tumour; a :class:`kits_keras.io.Volume`."""
    import numpy as np

    from kits_keras import io

    z, y, x = [(np.arange(n, dtype=np.float32) - n / 2) * s
               for n, s in zip(shape, spacing)]
    half_y, half_x = shape[1] * spacing[1] / 2, shape[2] * spacing[2] / 2
    body = ((y[:, None] / (0.55 * half_y)) ** 2
            + (x[None, :] / (0.7 * half_x)) ** 2) < 1
    image = np.empty(shape, np.int16)
    for k in range(shape[0]):
        plane = np.where(body, 40, -1000).astype(np.int16)
        for cx in (-0.3 * half_x, 0.3 * half_x):
            r = ((z[k] / (0.25 * z[-1] + 1)) ** 2
                 + ((y[:, None] - 0.1 * half_y) / (0.12 * half_y)) ** 2
                 + ((x[None, :] - cx) / (0.1 * half_x)) ** 2)
            plane[r < 1] = 160
            plane[r < 0.2] = 90
        image[k] = plane
    affine = np.diag([*spacing, 1.0]).astype(np.float64)
    return io.Volume(array=image, spacing=tuple(spacing), affine=affine)


def _tile_batches(volume, cfg):
    """Batch sizes the sliding window will feed the network."""
    from kits_keras.inference import sliding_window as sw
    from kits_keras.data.preprocessing import target_shape

    shape = target_shape(volume.array.shape, volume.spacing,
                         cfg.data.target_spacing)
    padded = [max(n, p) for n, p in zip(shape, cfg.data.patch_size)]
    steps = sw.compute_steps(padded, cfg.data.patch_size, cfg.infer.overlap)
    tiles, batch = math.prod(len(s) for s in steps), cfg.infer.batch_size
    return sorted({min(batch, tiles), tiles % batch} - {0})


def _inference(sizes, cfg, res):
    import keras
    import numpy as np

    from kits_keras.artifact import Artifact
    from kits_keras.config import override
    from kits_keras.model.unet import build_unet
    from kits_keras.inference.predict import predict_case
    from kits_keras.data.intensity import IntensityStats

    keras.config.set_dtype_policy("float32")  # what `kits-keras infer` uses
    keras.utils.set_random_seed(0)
    stats = IntensityStats(clip_low=-80.0, clip_high=300.0, mean=100.0,
                           std=75.0)
    art = Artifact(model=build_unet(cfg), config=cfg, stats=stats, path="")
    volume = synthetic_ct(sizes.case_shape, sizes.case_spacing)
    out = dict(case_shape=list(sizes.case_shape),
               case_spacing=list(sizes.case_spacing),
               target_spacing=list(cfg.data.target_spacing),
               patch=list(cfg.data.patch_size), dtype_policy="float32",
               tile_batch=cfg.infer.batch_size)
    start = time.perf_counter()
    for b in _tile_batches(volume, cfg):  # compiled once per batch size
        art.network(np.zeros((b, *cfg.data.patch_size, 1), np.float32))
    out["compile_s"] = time.perf_counter() - start
    res["inference"] = out
    for tta in ("none", "all"):
        config = override(cfg, infer={"tta": tta})
        pred = predict_case(volume, art.network, config, stats)
        t = pred.timings
        passes = pred.qc["tiles"] * (8 if tta == "all" else 1)
        out[f"tta_{tta}"] = dict(
            timings_s=t, seconds_per_case=t["total"],
            tiles=pred.qc["tiles"], tile_passes=passes,
            tiles_per_s=passes / t["sliding_window"],
            outside_network_pct=100.0 * (t["total"] - t["network"])
            / t["total"],
            resampled_shape=list(pred.probabilities.shape[:3]))
        res["inference"] = out


def _numerics(sizes, cfg, initial, batch, res):
    import jax
    import keras
    import numpy as np

    from kits_keras.model.unet import build_unet
    from kits_keras.training.step import init_state
    from kits_keras.training.step import make_loss_and_grad_norm

    x, ys = batch
    values = {}
    for policy in ("float32", "mixed_bfloat16"):
        keras.config.set_dtype_policy(policy)
        model = build_unet(cfg)
        model.set_weights(initial)
        state = init_state(model, keras.optimizers.Adam(3e-4))
        fn = make_loss_and_grad_norm(model, cfg.loss,
                                     output_mode=cfg.model.output_mode,
                                     label_set=cfg.data.label_set)
        loss, norm = jax.block_until_ready(fn(state, x, ys))
        values[policy] = (float(loss), float(norm))
    (l32, n32), (l16, n16) = values["float32"], values["mixed_bfloat16"]
    loss_rel, norm_rel = abs(l16 - l32) / abs(l32), abs(n16 - n32) / n32
    res["numerics"] = dict(
        loss_float32=l32, loss_bfloat16=l16, loss_rel_diff=loss_rel,
        grad_norm_float32=n32, grad_norm_bfloat16=n16,
        grad_norm_rel_diff=norm_rel, loss_rtol=LOSS_RTOL,
        grad_norm_rtol=GRAD_NORM_RTOL,
        finite=bool(np.all(np.isfinite([l32, n32, l16, n16]))),
        within_tolerance=bool(loss_rel <= LOSS_RTOL
                              and norm_rel <= GRAD_NORM_RTOL))


NO_ACCELERATOR = ("no GPU here: the full sizes would take hours on a CPU; "
                  "--smoke runs the same code at toy sizes")


def _part(res, name, deadline, fn, *args):
    """Runs one part of a section unless the soft deadline has passed;
    an error is recorded, not raised (the other parts still run)."""
    if time.time() > deadline:
        res[name] = {"skipped": "time limit reached before this part"}
        return None
    start = time.perf_counter()
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001  (recorded in the JSON)
        res[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        return None
    finally:
        res.setdefault("part_wall_s", {})[name] = time.perf_counter() - start


def jax_section(sizes, deadline, save):
    _block_host_only_packages()
    import jax
    import keras

    res = dict(jax=jax.__version__, keras=keras.__version__,
               backend=keras.backend.backend(),
               devices=[str(d) for d in jax.devices()],
               device_kind=jax.devices()[0].device_kind)
    if sizes.needs_accelerator and jax.devices()[0].platform == "cpu":
        res.update(run=False, reason=NO_ACCELERATOR)
    save(res)
    if res.get("run") is False:
        return res
    trained = _part(res, "train", math.inf, _train, sizes, res)
    save(res)
    if trained is None:
        return res
    cfg, initial, batch = trained
    for name, fn, args in (
            ("inference", _inference, (sizes, cfg, res)),
            ("data_parallel", _data_parallel,
             (cfg, initial, batch, res["train"], res)),
            ("numerics", _numerics, (sizes, cfg, initial, batch, res))):
        _part(res, name, deadline, fn, *args)
        save(res)
    return res


# ---------------------------------------------------------- torch section
def torch_section(sizes, deadline, save):
    from kits_keras.model.strides import model_strides
    from kits_keras.model.unet import level_filters

    cfg = experiment(sizes)
    strides, features = model_strides(cfg), level_filters(cfg.model)
    res = {}
    try:
        import torch
        from dynamic_network_architectures.architectures import unet  # noqa
    except ImportError as err:
        res.update(run=False, reason=f"not installed here: {err}")
        save(res)
        return res
    import dynamic_network_architectures as dna
    import numpy as np

    from benchmarks.train_step import make_inputs
    from benchmarks.train_step import torch_multi_scale_loss
    from benchmarks.train_step import torch_unet

    cuda = torch.cuda.is_available()
    if sizes.needs_accelerator and not cuda:
        res.update(run=False, reason=NO_ACCELERATOR)
        save(res)
        return res
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    x_np, ys_np = make_inputs(sizes.batch, sizes.patch, strides)
    x = torch.from_numpy(x_np[..., 0][:, None].copy()).to(device)
    ys = [torch.from_numpy(y.astype(np.int64)).to(device) for y in ys_np]
    res.update(run=True, torch=torch.__version__,
               dna=getattr(dna, "__version__", None), device=str(device),
               device_name=(torch.cuda.get_device_name() if cuda else "cpu"),
               batch=sizes.batch, patch=list(sizes.patch),
               autocast="bfloat16")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def measure(net):
        opt = torch.optim.Adam(net.parameters(), lr=3e-4)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        losses, times = [], []
        for _ in range(sizes.warmup + sizes.steps):
            sync()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                outputs = net(x)
            loss = torch_multi_scale_loss(outputs, ys)
            loss.backward()
            opt.step()
            losses.append(float(loss.item()))
            times.append(time.perf_counter() - t0)
        timed = times[sizes.warmup:]
        return dict(warmup_s=times[:sizes.warmup], step_s=timed,
                    median_s_per_step=statistics.median(timed),
                    losses=losses,
                    all_losses_finite=bool(np.all(np.isfinite(losses))),
                    peak_mem_gb=(torch.cuda.max_memory_allocated() / GB
                                 if cuda else None))

    net = torch_unet(strides, features).to(device).train()
    res["params"] = sum(p.numel() for p in net.parameters())
    try:
        res["eager"] = measure(net)
    except Exception as err:  # noqa: BLE001
        res["eager"] = {"error": f"{type(err).__name__}: {err}"[:2000]}
    save(res)
    if time.time() > deadline:
        res["compiled"] = {"skipped": "time limit reached before it"}
    else:
        try:
            torch.manual_seed(0)
            compiled = torch.compile(torch_unet(strides, features).to(
                device).train())
            res["compiled"] = measure(compiled)
        except Exception as err:  # noqa: BLE001
            res["compiled"] = {"error": f"{type(err).__name__}: {err}"[:2000]}
    save(res)
    return res


# ------------------------------------------------------ max batch section
def largest_batch_estimate(batch, step_bytes, state_bytes, limit):
    """Largest batch whose compiled step fits in ``limit`` bytes, from one
    compiled batch: ``2 * state_bytes`` fixed (weights, Adam moments,
    gradients), the rest growing with the batch.

    Example:
        >>> largest_batch_estimate(8, 8 * 10 + 20, 10, 420)
        40
    """
    fixed = 2 * state_bytes
    per_sample = max(step_bytes - fixed, 1) / batch
    return int((limit - fixed) // per_sample)


def max_batch_section(sizes, deadline, save):
    _block_host_only_packages()
    import jax
    import keras
    import numpy as np

    from kits_keras.model.unet import build_unet
    from kits_keras.training.step import make_train_step

    if sizes.needs_accelerator and jax.devices()[0].platform == "cpu":
        res = dict(run=False, reason=NO_ACCELERATOR)
        save(res)
        return res
    cfg = experiment(sizes)
    keras.config.set_dtype_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    model = build_unet(cfg)
    step, state = make_train_step(model, cfg.loss,
                                  keras.optimizers.Adam(3e-4),
                                  output_mode=cfg.model.output_mode,
                                  label_set=cfg.data.label_set)
    host_state = jax.device_get(state)  # each try starts from a fresh copy
    _, limit = _device_memory(jax)
    source = "device bytes_limit"
    if limit is None:
        limit, source = int(sizes.memory_limit_gb * GB), "--smoke setting"
    x_np, ys_np = _inputs(jax, cfg, sizes.batch)
    step_bytes = _memory_bytes(step.lower(state, x_np, ys_np).compile())
    state_bytes = sum(int(a.nbytes) for a in jax.tree.leaves(host_state))
    estimate = largest_batch_estimate(sizes.batch, step_bytes, state_bytes,
                                      limit)
    res = dict(memory_limit_gb=limit / GB, memory_limit_source=source,
               compiled_step_bytes={str(sizes.batch): step_bytes},
               state_bytes=state_bytes, estimated_largest_batch=estimate)
    save(res)
    batch = min(estimate, sizes.max_batch_cap)
    while batch >= 1 and time.time() < deadline:
        try:
            x_np, ys_np = _inputs(jax, cfg, batch)
            state = jax.device_put(host_state)
            compiled = step.lower(state, x_np, ys_np).compile()
            res["compiled_step_bytes"][str(batch)] = _memory_bytes(compiled)
            state, loss = compiled(state, x_np, ys_np)
            jax.block_until_ready(loss)
            t0 = time.perf_counter()
            state, loss = compiled(state, x_np, ys_np)
            loss = float(jax.block_until_ready(loss))
            res.update(largest_batch_run=batch, capped=batch < estimate,
                       s_per_step=time.perf_counter() - t0,
                       loss_finite=bool(np.isfinite(loss)))
            break
        except Exception as err:  # noqa: BLE001  (out of memory: smaller)
            res.setdefault("failed", []).append(
                {"batch": batch, "error": str(err)[:300]})
            state = None
            batch = int(batch * 0.9)
        save(res)
    save(res)
    return res


WORKERS = {"jax": jax_section, "torch": torch_section,
           "max_batch": max_batch_section}


def run_worker(args):
    sizes = MODES[args.mode]
    params = json.loads(args.params)

    def save(res):
        common.write_json(args.result, res)

    WORKERS[args.worker](sizes, params.pop("deadline"), save, **params)


# ------------------------------------------------------------------ parent
def run_section(name, mode, deadline, hard, log):
    """Runs one section in a subprocess until it ends or ``hard`` (epoch
    seconds); returns what it saved, with its wall time and exit status."""
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONUNBUFFERED="1",
               # Take device memory as needed (the default grabs 75 % at
               # start) and let the largest-batch search use nearly all.
               XLA_PYTHON_CLIENT_PREALLOCATE="false",
               XLA_PYTHON_CLIENT_MEM_FRACTION="0.95",
               # A rerun (--only) on the same machine skips recompiling.
               JAX_COMPILATION_CACHE_DIR=os.environ.get(
                   "JAX_COMPILATION_CACHE_DIR", os.path.join(
                       tempfile.gettempdir(), "kits_keras_jax_cache")),
               PYTHONPATH=os.pathsep.join(
                   p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    if mode == "smoke" and name == "jax":  # data parallel over 2 devices
        env["XLA_FLAGS"] = " ".join(filter(None, (
            env.get("XLA_FLAGS"), "--xla_force_host_platform_device_count=2")))
    with tempfile.TemporaryDirectory(prefix="kits_gpu_check_") as tmp:
        out = os.path.join(tmp, "section.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name,
               "--mode", mode, "--result", out, "--params",
               json.dumps({"deadline": deadline})]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                stderr=log)
        try:
            code = proc.wait(timeout=max(1.0, hard - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = "killed at the time limit"
        res = {}
        if os.path.exists(out):
            with open(out) as fh:
                res = json.load(fh)
    res.update(wall_s=time.perf_counter() - start, exit=code)
    return res


def summarise(sections):
    jax_res = sections.get("jax", {})
    train = jax_res.get("train", {})
    infer = jax_res.get("inference", {})
    torch_res = sections.get("torch", {})
    torch_times = [torch_res.get(k, {}).get("median_s_per_step")
                   for k in ("eager", "compiled")]
    torch_times = [t for t in torch_times if t]
    step = train.get("median_s_per_step")
    ratio = step / min(torch_times) if step and torch_times else None
    summary = dict(
        gpu_device=(jax_res.get("device_kind")),
        gpu_train_s_per_step_bf16_b8=step,
        gpu_tflops_achieved=train.get("tflops_achieved"),
        gpu_mfu_pct=train.get("mfu_pct"),
        gpu_train_time_ratio_vs_torch=ratio,
        gpu_infer_s_per_case_tta_all=infer.get("tta_all", {}).get(
            "seconds_per_case"),
        gpu_peak_mem_gb=train.get("peak_mem_gb"),
        gpu_infer_s_per_case_tta_none=infer.get("tta_none", {}).get(
            "seconds_per_case"),
        gpu_torch_s_per_step=min(torch_times) if torch_times else None,
        gpu_largest_batch=sections.get("max_batch", {}).get(
            "largest_batch_run"),
        gpu_no_nan=train.get("all_losses_finite"),
        gpu_data_parallel_same_loss=jax_res.get("data_parallel", {}).get(
            "same_loss"),
        gpu_bf16_within_tolerance=jax_res.get("numerics", {}).get(
            "within_tolerance"),
    )
    goals = {
        "s_per_step_le_0.25": None if step is None else step <= GOAL_S_PER_STEP,
        "mfu_ge_30_pct": (None if summary["gpu_mfu_pct"] is None
                          else summary["gpu_mfu_pct"] >= GOAL_MFU_PCT),
        "no_slower_than_torch": None if ratio is None else ratio <= 1.0,
    }
    return summary, goals


def main(args):
    sizes = MODES[args.mode]
    limit = args.time_limit_s or sizes.time_limit_s
    out = args.out or (RESULT if args.mode == "gpu" else os.path.join(
        tempfile.gettempdir(), "kits_keras_gpu_smoke.json"))
    only = args.only.split(",") if args.only else list(SECTIONS)
    unknown = set(only) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--only: unknown sections {sorted(unknown)}; "
                         f"choose from {SECTIONS}")
    record = common.result_header("gpu_check")
    record["sections"] = {}
    if args.only and os.path.exists(out):  # a rerun completes the record
        with open(out) as fh:
            record["sections"] = json.load(fh).get("sections", {})
    record.update(mode=args.mode, setup=dataclasses.asdict(sizes),
                  time_limit_s=limit, peak_bf16_tflops=PEAK_BF16_TFLOPS)
    start = time.time()
    soft = dict(sizes.soft_deadlines)
    log = sys.stderr if args.verbose else subprocess.DEVNULL
    for name in only:
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        deadline = start + soft[name] * limit
        hard = start + limit if name == only[-1] else (
            deadline + 0.1 * limit)
        record["sections"][name] = run_section(
            name, args.mode, deadline, hard, log)
        summary, goals = summarise(record["sections"])
        record.update(summary=summary, goals=goals,
                      wall_s=time.time() - start)
        common.write_json(out, record)
    print(json.dumps(dict(record["summary"], goals=record["goals"],
                          out=out), indent=1, default=str))
    return record


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", dest="mode", action="store_const",
                   const="smoke", default="gpu",
                   help="toy sizes on the CPU (CI): the same code, < 60 s")
    p.add_argument("--out", default=None,
                   help=f"JSON to write [default: {RESULT}; --smoke: a "
                        "file in the temporary folder]")
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="whole run, sections included [default: 420; "
                        "--smoke: 150]")
    p.add_argument("--only", default=None,
                   help="comma list of sections to (re)run, merged into an "
                        f"existing --out: {','.join(SECTIONS)}")
    p.add_argument("--verbose", action="store_true",
                   help="show the sections' own output")
    p.add_argument("--worker", choices=SECTIONS, help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--params", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    args = parse_args()
    if args.worker:
        run_worker(args)
    else:
        main(args)
