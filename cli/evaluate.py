"""``kits-keras evaluate``: KiTS19 Dice (or KiTS23 HEC Dice and Surface
Dice) of predictions against ground truth."""

import click

from cli.common import UserError
from cli.common import user_errors


@click.command("evaluate")
@click.argument("pred_dir", metavar="PRED", type=click.Path(path_type=str))
@click.argument("truth_dir", metavar="GT", type=click.Path(path_type=str))
@click.option("--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=str),
              help="Folder for scores.json, scores.csv, dice_boxplot.png "
              "and best/median/worst overlay PNGs.")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier report in --out (refused otherwise, "
              "before any work).")
@click.option("--metric", type=click.Choice(["kits19", "kits23"]),
              default="kits19", show_default=True,
              help="kits19: kidney (label > 0) and tumour (label > 1) Dice. "
              "kits23: Dice and Surface Dice (at KiTS23's tolerance in mm) "
              "of kidney+masses {1,2,3}, masses {2,3} and tumour {2}; labels "
              "0-3 (3 = cyst).")
@user_errors
def evaluate(pred_dir, truth_dir, out_dir, overwrite, metric):
    """Score predictions PRED against ground truth GT (KiTS19 metric, or
    KiTS23's with --metric kits23).

    PRED and GT are folders of KiTS19 case folders
    (case_XXXXX/segmentation.nii.gz) or of flat files (case_XXXXX.nii.gz,
    prediction_XXXXX.nii.gz, case_XXXXX_seg.nii.gz), matched by case id.
    Kidney Dice is over label > 0, tumour Dice over label > 1; both empty
    gives 1; a missing prediction scores 0. Exits with 1 if a case could
    not be scored (unreadable file, prediction or the case's CT on another
    grid). Refused with exit 1 before any work: no prediction at all, none
    matching a ground-truth case, two files for one case (e.g.
    case_00001.nii.gz and prediction_00001.nii.gz). Hidden files (a dot
    first) are ignored.
    """
    from kits_keras.evaluate import evaluate as run
    from kits_keras.evaluate import format_table

    report, paths = run(pred_dir, truth_dir, out_dir, overwrite, metric)
    click.echo(format_table(report))
    if report["missing"]:
        click.echo(f"missing predictions (scored 0): "
                   f"{', '.join(report['missing'])}", err=True)
    for name, path in paths.items():
        click.echo(f"{name}: {path}")
    if report["errors"]:
        raise UserError(f"{len(report['errors'])} case(s) could not be "
                        f"scored: {', '.join(report['errors'])}")
