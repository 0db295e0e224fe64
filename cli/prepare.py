"""``kits-keras prepare``: build the kits19 TFDS dataset from case folders."""

import click

from cli.common import user_errors


@click.command()
@click.option("--manual-dir", required=True,
              type=click.Path(exists=True, file_okay=False),
              help="Folder of case_XXXXX/ (KiTS19 data/ or `kits-keras "
                   "synth` output).")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False),
              help="TFDS data directory [$TFDS_DATA_DIR or "
                   "~/tensorflow_datasets].")
@click.option("--config", "config_name", default="interp_3.0x0.78mm",
              show_default=True,
              help="Dataset config (interp_3.0x0.78mm, coarse_3.22x1.62mm, "
                   "demo_4.0x3.2mm) or experiment name (paper, coarse, "
                   "tiny).")
@click.option("--workers", type=int, default=None,
              help="Cases processed in parallel [usable cores].")
@click.option("--skip-bad-cases", is_flag=True,
              help="Skip unreadable cases and list them at the end instead "
                   "of stopping.")
@click.option("--rebuild", is_flag=True,
              help="Replace an existing dataset that was built from other "
                   "files or by other preprocessing code (the old one is "
                   "deleted only once the new one is finished).")
@user_errors
def prepare(manual_dir, data_dir, config_name, workers, skip_bad_cases,
            rebuild):
    """Resample and normalise KiTS19 cases into a TFDS dataset.

    \b
    Splits: the labelled case ids, sorted; every 5th is a test case. With
    fewer than 5 labelled cases (or all test cases skipped as bad) the
    dataset has no test split; `fit` then holds out
    data.validation_cases training cases for validation when it can, and
    otherwise trains without validation. Any number of labelled cases >= 1
    builds; no usable training case is an error.

    \b
    Reuse: the dataset records what it was built from (case ids; each
    file's size, modification time and gzip checksum; a hash of the
    preprocessing code; the experiment's data.foreground_samples, the
    default one for a dataset config name). A rerun on the same files (in any folder) does
    nothing; on changed files (cases added, removed or re-saved, a folder
    with other cases, new preprocessing code) it stops with one line naming
    what changed: pass --rebuild to replace the dataset. A folder left by
    an interrupted build is removed by the next run; an interrupted
    --rebuild leaves the old dataset in place.
    """
    from kits_keras.data import prepare as dataset

    result = dataset.prepare(manual_dir, data_dir, config_name, workers,
                             skip_bad_cases, rebuild=rebuild)
    state = "built" if result.built else "already prepared, nothing to do"
    splits = ", ".join(f"{k} {v}" for k, v in sorted(
        result.num_examples.items()))
    click.echo(f"{result.name}: {state} ({splits}) in {result.path}")
    for case_id, reason in sorted(result.skipped_cases.items()):
        click.echo(f"skipped {case_id}: {reason}", err=True)
