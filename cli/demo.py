"""``kits-keras demo``: synthesis to Dice in one command, on a CPU."""

import click

from cli.common import backend_option
from cli.common import user_errors


@click.command("demo")
@click.option("--out", "out_dir", default="demo-out", show_default=True,
              type=click.Path(file_okay=False, path_type=str),
              help="Folder for cases, dataset, run, predictions and scores.")
@click.option("--steps", default=None, type=click.IntRange(min=1),
              help="Training iterations [default: the tiny experiment's "
              "60 epochs x 25 = 1500]. Fixed work, not time: the same Dice "
              "on every machine.")
@click.option("--cases", "num_cases", default=25, show_default=True,
              type=click.IntRange(min=5),
              help="Synthetic cases; every 5th is held out for testing.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--dataset", type=click.Choice(("kits19", "kits23")),
              default="kits19", show_default=True,
              help="kits23: cysts (label 3) in the synthetic cases, the "
              "kits23_tiny experiment and KiTS23's HEC Dice / Surface Dice.")
@backend_option()
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier demo in --out.")
@user_errors
def demo(out_dir, steps, num_cases, seed, dataset, backend, overwrite):
    """Synthesise cases, build the dataset, train the tiny model, segment
    the held-out cases and score them with the KiTS19 (or KiTS23) metric."""
    from kits_keras.backend import select_backend

    click.echo(f"Keras backend: {select_backend(backend)}")
    from kits_keras.demo import DemoOptions
    from kits_keras.demo import run_demo
    from kits_keras.evaluate import format_table

    result = run_demo(DemoOptions(out_dir=out_dir, steps=steps,
                                  num_cases=num_cases, seed=seed,
                                  overwrite=overwrite, dataset=dataset))
    click.echo("")
    click.echo(format_table(result["scores"]))
    click.echo("")
    click.echo("seconds per stage: " + ", ".join(
        f"{k} {v:.0f}" for k, v in result["seconds"].items()))
    click.echo(f"outputs in {out_dir}: run/loss_curves.png, "
               "evaluation/dice_boxplot.png, evaluation/*overlay*.png, "
               "predictions/summary.json, demo.json")
