"""``kits-keras show-batch``: a PNG grid of augmented training patches."""

import click

from cli.common import user_errors


@click.command("show-batch")
@click.option("--data-dir", required=True,
              type=click.Path(exists=True, file_okay=False),
              help="TFDS data directory holding the prepared kits19 "
                   "dataset (`kits-keras prepare`).")
@click.option("--config", "config_name", default="paper", show_default=True,
              help="Experiment: paper, coarse or tiny.")
@click.option("--num", type=click.IntRange(1, 64), default=8,
              show_default=True, help="Patches to draw.")
@click.option("--seed", type=int, default=None,
              help="Sampling/augmentation seed [the config's train.seed].")
@click.option("-o", "--output", required=True,
              type=click.Path(dir_okay=False),
              help="PNG to write (atomically).")
@user_errors
def show_batch(data_dir, config_name, num, seed, output):
    """Draw augmented training patches exactly as training samples them.

    Each patch: central axial slice above central coronal plane, kidney and
    tumour outlines, and whether it was sampled at random or centred on
    foreground / tumour.
    """
    from kits_keras import config
    from kits_keras.data.preview import save_training_batch_preview

    path = save_training_batch_preview(
        output, config.get_config(config_name), data_dir, num=num, seed=seed
    )
    click.echo(path)
