"""``kits-keras synth``: synthetic KiTS19-layout cases."""

import click

from cli.common import user_errors


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--cases", "num_cases", type=click.IntRange(min=1),
              default=None,
              help="Number of cases [default: 3; with --labels-from: all].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Case i uses seed SEED + i; same seed, same bytes.")
@click.option("--size", type=click.Choice(["small", "full"]),
              default="small", show_default=True,
              help="small: ~24-64 slices at 2-3 mm in plane (tests); "
                   "full: KiTS19 sizes (512x512 or 512x796, 0.5-5 mm slices).")
@click.option("--labels-from", type=click.Path(),
              default=None,
              help="Folder of case_XXXXX/segmentation.nii.gz: one case per "
                   "label volume, built around it (keeps ids and geometry).")
@click.option("--preview", is_flag=True,
              help="Also write case_XXXXX/preview.png (axial, coronal, "
                   "sagittal through the tumour, label outlines).")
@click.option("--overwrite", is_flag=True,
              help="Replace existing case folders in OUT_DIR.")
@user_errors
def synth(out_dir, num_cases, seed, size, labels_from, preview, overwrite):
    """Writes synthetic contrast-enhanced CT cases to OUT_DIR.

    Each case is a KiTS19 folder: case_XXXXX/imaging.nii.gz (HU) and
    segmentation.nii.gz (0 background, 1 kidney, 2 tumour), axis 0 = slices.
    Nothing is moved into OUT_DIR until every case has been written.
    """
    from kits_keras import synthetic

    def report(case_dir, case):
        s = synthetic.case_summary(case)
        shape = "x".join(str(n) for n in s["shape"])
        spacing = "x".join(f"{v:.2f}" for v in s["spacing"])
        click.echo(f"{case_dir}: {shape} voxels, {spacing} mm, kidney "
                   f"{s['kidney_ml']:.0f} mL, tumour {s['tumour_ml']:.1f} mL")

    written = synthetic.write_cases(
        out_dir, num_cases, seed=seed, size=size, labels_from=labels_from,
        preview=preview, overwrite=overwrite, on_case=report)
    click.echo(f"wrote {len(written)} case(s) to {out_dir}")
