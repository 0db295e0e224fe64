"""Benchmark: SavedModel export of the paper-size U-Net, time and size.

Run: ``/work/venv/bin/python benchmarks/export.py`` (about 2-3 min on 2
cores). Writes ``benchmarks/results/export.json``.

Steps, each in a fresh process:

1. setup (not timed): build the paper-config U-Net (5 levels, base 30,
   48 x 192 x 192 patches) with random weights and save it as a run folder
   artifact (``RUN/model.keras``);
2. ``kits-keras export RUN OUT`` as a user runs it, timed end to end
   (interpreter start, imports, artifact load, jax2tf lowering, writing);
3. the library call :func:`kits_keras.inference.export.export_saved_model`
   on the already loaded model, timed alone, plus a parity check of the
   SavedModel against Keras on one patch.

There is no peer: nnU-Net and MONAI ship no TF Serving export.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def make_run(run_dir, config_name):
    """Saves a randomly initialised model of ``config_name`` as a run."""
    from kits_keras import artifact
    from kits_keras.config import get_config
    from kits_keras.model.unet import build_unet
    from kits_keras.data.intensity import IntensityStats

    config = get_config(config_name)
    model = build_unet(config)
    stats = IntensityStats(clip_low=-79.0, clip_high=304.0, mean=101.0,
                           std=76.9)
    path = os.path.join(run_dir, artifact.MODEL_FILE)
    artifact.save_artifact(model, config, stats, path)
    return {"params": int(model.count_params()),
            "model_keras_bytes": os.path.getsize(path)}


def measure_library(run_dir, out_dir):
    """Times ``export_saved_model`` on a loaded model; checks parity."""
    import numpy as np

    from kits_keras.inference import export
    from kits_keras.artifact import load_artifact
    from kits_keras.backend import import_tensorflow

    tf = import_tensorflow()
    art = load_artifact(run_dir)
    start = time.perf_counter()
    path = export.export_saved_model(art.model, out_dir, config=art.config,
                                     stats=art.stats)
    seconds = time.perf_counter() - start
    # A small patch (multiple of the total stride) keeps the check quick.
    patch = np.random.default_rng(0).normal(size=(1, 16, 64, 64, 1))
    patch = patch.astype(np.float32)
    served = tf.saved_model.load(path).signatures["serving_default"]
    got = served(image=tf.constant(patch))["probabilities"].numpy()
    return {"seconds": seconds,
            "max_abs_diff_vs_keras": float(np.abs(got - art.network(patch))
                                           .max())}


def sizes(path):
    """MB of the version folder and its parts."""
    from kits_keras.inference.export import folder_size

    def mb(nbytes):
        return round(nbytes / 1e6, 2)

    return {
        "total_mb": mb(folder_size(path)),
        "saved_model_pb_mb": mb(os.path.getsize(
            os.path.join(path, "saved_model.pb"))),
        "variables_mb": mb(folder_size(os.path.join(path, "variables"))),
        "assets_mb": mb(folder_size(os.path.join(path, "assets"))),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="paper")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kits_export_bench_") as tmp:
        run_dir = os.path.join(tmp, "run")
        os.makedirs(run_dir)
        setup = common.call_in_subprocess(
            __file__, "make_run", {"run_dir": run_dir,
                                   "config_name": args.config},
            threads=args.threads)["result"]

        cli = os.path.join(os.path.dirname(sys.executable), "kits-keras")
        out_cli = os.path.join(tmp, "served_cli")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([cli, "export", run_dir, out_cli], check=True,
                       env=common.thread_env(args.threads),
                       capture_output=True)
        cli_seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU seconds of the export process alone: a load-independent figure
        # when other jobs share the cores.
        cli_cpu = (after.ru_utime - before.ru_utime) + (
            after.ru_stime - before.ru_stime)
        cli_sizes = sizes(os.path.join(out_cli, "1"))

        lib = common.call_in_subprocess(
            __file__, "measure_library",
            {"run_dir": run_dir, "out_dir": os.path.join(tmp, "served_lib")},
            threads=args.threads)

    summary = {
        "config": args.config,
        "cli_export_seconds": round(cli_seconds, 2),
        "cli_export_cpu_seconds": round(cli_cpu, 2),
        "library_export_seconds": round(lib["result"]["seconds"], 2),
        "saved_model_mb": cli_sizes["total_mb"],
        "model_keras_mb": round(setup["model_keras_bytes"] / 1e6, 2),
        "params": setup["params"],
        "under_one_minute": cli_seconds < 60,
        "max_abs_diff_vs_keras": lib["result"]["max_abs_diff_vs_keras"],
    }
    path = common.write_results("export", {
        "raw": {
            "setup": setup,
            "cli": {"seconds": cli_seconds, "cpu_seconds": cli_cpu,
                    "load_average_1min": os.getloadavg()[0],
                    "sizes": cli_sizes,
                    "command": "kits-keras export RUN OUT"},
            "library": lib,
            "threads": args.threads,
        },
        "summary": summary,
    })
    print(path)
    for key, value in summary.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
