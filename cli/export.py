"""``kits-keras export``: a trained model as a SavedModel for TF Serving."""

import click

from cli.common import user_errors


@click.command("export")
@click.argument("model", type=click.Path(exists=True))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--version", "version", type=click.IntRange(min=1), default=1,
    show_default=True,
    help="Version folder under OUT_DIR; an existing one is never overwritten.",
)
@click.option(
    "--fixed-size", is_flag=True,
    help="Fix the input's spatial size to the training patch size (default: "
    "any size that is a multiple of the network's total stride).",
)
@user_errors
def export(model, out_dir, version, fixed_size):
    """Export MODEL (a run directory or its model.keras) to OUT_DIR/VERSION.

    OUT_DIR is the model base path TF Serving watches. The signature
    ``serving_default`` maps ``image`` float32 (batch, z, y, x, 1) to
    ``probabilities`` float32 (batch, z, y, x, 3); preprocessing statistics,
    spacing, patch size and class names are in assets/kits_keras.json.
    """
    # Export goes through jax2tf: Keras must run on JAX, whatever the host.
    from kits_keras.backend import select_backend

    select_backend("jax")
    from kits_keras.inference.export import export_saved_model

    path = export_saved_model(
        model, out_dir, version=version, fixed_size=fixed_size
    )
    click.echo(path)
