"""``kits-keras demo``: the whole method on synthetic cases, on a CPU.

Synthesises KiTS19-layout cases, builds the TFDS dataset, trains the
``tiny`` experiment, segments the held-out (test split) cases with
post-processing, and scores them with the KiTS19 metric. Everything lands
in one folder::

    OUT/cases/          synthetic case_XXXXX/ folders (all splits)
    OUT/tfds/           the kits19/<config> TFDS dataset
    OUT/run/            training run (model.keras, history.csv,
                        loss_curves.png, checkpoints/)
    OUT/predictions/    <case_id>.nii.gz + per-case JSON (volumes in mL,
                        QC), summary.json, previews
    OUT/evaluation/     scores (JSON, CSV), box plot, best/median/worst
                        overlays
    OUT/demo.json       per-case Dice, means and seconds per stage

``dataset="kits23"`` does the same with KiTS23's classes: cysts painted
into the synthetic cases (label 3), the ``kits23`` builder, the
``kits23_tiny`` experiment, and KiTS23's metric (Dice and Surface Dice of
kidney + masses, masses and tumour).
"""

import dataclasses
import logging
import os
import shutil
import time

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    """What the demo does.

    Attributes:
        out_dir: output folder.
        steps: training iterations. A fixed amount of work, not of time,
            so that the Dice is the same on every machine for a seed;
            None means the experiment's ``epochs * steps_per_epoch``
            (tiny: 60 x 25 = 1,500).
        num_cases: synthetic cases; every 5th goes to the test split.
        seed: seed for synthesis and training.
        config: experiment name; None: ``tiny``, or ``kits23_tiny`` for
            ``dataset="kits23"``.
        overwrite: replace an existing demo folder's contents.
        dataset: ``"kits19"`` (labels 0-2, KiTS19 metric) or ``"kits23"``
            (cysts too, KiTS23's hierarchical metric).
    """

    out_dir: str = "demo-out"
    steps: int = None
    num_cases: int = 25
    seed: int = 0
    config: str = None
    overwrite: bool = False
    dataset: str = "kits19"


DATASETS = {"kits19": "tiny", "kits23": "kits23_tiny"}


def _timed(timings, name, fn, *args, **kwargs):
    log.info("== %s", name)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    timings[name] = round(time.perf_counter() - start, 1)
    log.info("   %s took %.1f s", name, timings[name])
    return result


def _check_out_dir(options):
    if os.path.exists(options.out_dir) and os.listdir(options.out_dir):
        if not options.overwrite:
            raise ValueError(
                f"{options.out_dir}: not empty; pass --overwrite to replace "
                "the demo there or choose another --out")
        for name in ("cases", "tfds", "run", "predictions", "truth",
                     "evaluation", "demo.json"):
            path = os.path.join(options.out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(options.out_dir, exist_ok=True)


def _truth_folder(cases_dir, case_ids, truth_dir):
    """Links the test cases' folders into ``truth_dir`` for evaluation."""
    os.makedirs(truth_dir, exist_ok=True)
    for case_id in case_ids:
        os.symlink(os.path.abspath(os.path.join(cases_dir, case_id)),
                   os.path.join(truth_dir, case_id))
    return truth_dir


def _split_case_ids(config, data_dir):
    """``(train ids, test ids)`` recorded in the prepared dataset."""
    from kits_keras.data.prepared import prepared_builder

    meta = prepared_builder(config, data_dir).info.metadata
    return list(meta["train_case_ids"]), sorted(meta["test_case_ids"])


def demo_config(options):
    """The experiment the demo trains: ``options.config`` (default the
    dataset's), with the demo's seed, steps, validation cases and all 8
    mirrorings at inference."""
    from kits_keras import config as config_lib

    if options.dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}. "
                         f"Received: dataset={options.dataset!r}")
    config = config_lib.get_config(options.config
                                   or DATASETS[options.dataset])
    # Three validation cases (not one) so the best checkpoint is chosen on
    # more than one tumour; all 8 mirrorings at inference (cheap here).
    train = {"seed": options.seed}
    if options.steps is not None:
        per_epoch = min(config.train.steps_per_epoch, int(options.steps))
        train.update(steps_per_epoch=per_epoch,
                     epochs=max(1, round(options.steps / per_epoch)))
    return config_lib.override(
        config, train=train,
        data={"validation_cases": 3 if options.num_cases >= 20 else 1},
        infer={"tta": "all"})


def run_demo(options=DemoOptions()):
    """Runs the demo; returns the dict also written to ``OUT/demo.json``."""
    from kits_keras.data import prepare as dataset
    from kits_keras import evaluate
    from kits_keras.inference import batch
    from kits_keras.inference.jobs import InferOptions
    from kits_keras.synthetic import cases as synthetic
    from kits_keras.training import fit as training

    _check_out_dir(options)
    out = options.out_dir
    paths = {k: os.path.join(out, k) for k in
             ("cases", "tfds", "run", "predictions", "truth", "evaluation")}
    config = demo_config(options)
    kits23 = options.dataset == "kits23"
    timings = {}
    _timed(timings, "synthesise", synthetic.write_cases, paths["cases"],
           options.num_cases, seed=options.seed, size="small",
           cysts=kits23)
    _timed(timings, "prepare", dataset.prepare, paths["cases"],
           data_dir=paths["tfds"], config=config.data)
    _timed(timings, "train", training.fit, config, paths["tfds"],
           out_dir=paths["run"])
    train_ids, test_ids = _split_case_ids(config, paths["tfds"])
    inputs = [os.path.join(paths["cases"], c) for c in test_ids]
    summary = _timed(
        timings, "infer", batch.run_inference, inputs,
        output=paths["predictions"], model=paths["run"],
        options=InferOptions(preview=True))
    if summary["failures"]:
        raise RuntimeError(f"inference failed: {summary['failures']}")
    truth = _truth_folder(paths["cases"], test_ids, paths["truth"])
    report, report_paths = _timed(
        timings, "evaluate", evaluate.evaluate, paths["predictions"], truth,
        paths["evaluation"], metric=options.dataset)
    result = {
        "config": config.name,
        "dataset": options.dataset,
        "cases": {"train": train_ids, "test": test_ids},
        "scores": report,
        "volumes_ml": {c["case_id"]: c["volumes"] for c in summary["cases"]},
        "seconds": timings,
        "outputs": {"run": paths["run"], "evaluation": report_paths,
                    "predictions": paths["predictions"]},
    }
    from kits_keras.files import write_json

    write_json(os.path.join(out, "demo.json"), result, default=str)
    return result
