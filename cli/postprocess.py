"""``kits-keras postprocess``: connected-component clean-up of labels."""

import click

from cli.common import user_errors
from kits_keras.config import PostprocessConfig


@click.command("postprocess")
@click.argument("input_path", metavar="IN", type=click.Path(path_type=str))
@click.argument("output_path", metavar="OUT", type=click.Path(path_type=str))
@click.option("--min-fraction", type=click.FloatRange(0, 1),
              default=PostprocessConfig.min_fraction, show_default=True,
              help="Drop kidney components smaller than this share of the "
              "largest.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@user_errors
def postprocess(input_path, output_path, min_fraction, overwrite):
    """Keep the two largest kidney components; drop detached tumour.

    IN and OUT are label NIfTI files (0 background, 1 kidney, 2 tumour);
    OUT keeps IN's grid and header.
    """
    from kits_keras.inference.postprocess import postprocess_file

    removed = postprocess_file(
        input_path, output_path, PostprocessConfig(min_fraction=min_fraction),
        overwrite=overwrite,
    )
    click.echo(f"{output_path}: {removed} voxels removed")
