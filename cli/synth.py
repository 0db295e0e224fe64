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
              help="Folder of case_XXXXX/segmentation.nii.gz (KiTS19, or "
                   "KiTS23: cysts are painted as cysts, labelled kidney "
                   "unless --classes kits23): one case per label volume, "
                   "built around it (keeps ids and geometry).")
@click.option("--classes", type=click.Choice(["kits19", "kits23"]),
              default="kits19", show_default=True,
              help="kits19: labels 0-2. kits23: adds 3 = cyst; generated "
                   "cases get 0-3 simple cysts (round, 0-20 HU), "
                   "--labels-from keeps its cysts as 3.")
@click.option("--extra-tumours", type=click.IntRange(min=0), default=0,
              show_default=True,
              help="With --labels-from: tumours added to each label "
                   "volume's kidneys (more tumours for a small training "
                   "set; its labels include them).")
@click.option("--format", "fmt", type=click.Choice(["nifti", "dicom"]),
              default="nifti", show_default=True,
              help="nifti: KiTS19 folders. dicom: each case a folder of "
                   "one CT series (case_XXXXX/IM_NNNN.dcm, HU + 1024 with "
                   "RescaleIntercept -1024) and segmentation.nii.gz on its "
                   "grid; needs the kits-keras[dicom] extra.")
@click.option("--dicom-variant", default="head-first", show_default=True,
              type=click.Choice(["head-first", "feet-first",
                                 "shuffled-names", "shuffled-instances",
                                 "rle", "jpeg-ls", "jpeg2000", "gantry-tilt",
                                 "irregular-spacing", "missing-slice", "mr",
                                 "localizer", "mixed"]),
              help="With --format dicom: how the series is stored. The "
                   "first seven read back as the same volume (feet-first "
                   "scan, shuffled file names or InstanceNumbers, "
                   "compressed); the others are defects kits-keras infer "
                   "refuses (no segmentation.nii.gz is written for them).")
@click.option("--preview", is_flag=True,
              help="Also write case_XXXXX/preview.png (axial, coronal, "
                   "sagittal through the tumour, label outlines).")
@click.option("--overwrite", is_flag=True,
              help="Replace existing case folders in OUT_DIR.")
@user_errors
def synth(out_dir, num_cases, seed, size, labels_from, classes,
          extra_tumours, fmt, dicom_variant, preview, overwrite):
    """Writes synthetic contrast-enhanced CT cases to OUT_DIR.

    Each case is a KiTS19 folder: case_XXXXX/imaging.nii.gz (HU) and
    segmentation.nii.gz (0 background, 1 kidney, 2 tumour; with --classes
    kits23 also 3 cyst), axis 0 = slices.
    Nothing is moved into OUT_DIR until every case has been written.
    """
    from kits_keras.synthetic import cases as synthetic

    def report(case_dir, case):
        s = synthetic.case_summary(case)
        shape = "x".join(str(n) for n in s["shape"])
        spacing = "x".join(f"{v:.2f}" for v in s["spacing"])
        cyst = f", cyst {s['cyst_ml']:.1f} mL" if cysts else ""
        click.echo(f"{case_dir}: {shape} voxels, {spacing} mm, kidney "
                   f"{s['kidney_ml']:.0f} mL, tumour {s['tumour_ml']:.1f} mL"
                   f"{cyst}")

    cysts = classes == "kits23"

    if fmt == "dicom":
        if labels_from is not None or preview or cysts or extra_tumours:
            raise ValueError("--format dicom takes neither --labels-from, "
                             "--extra-tumours, --preview nor --classes "
                             "kits23")
        from kits_keras.dicom import write as dicom_write

        written = dicom_write.write_dicom_cases(
            out_dir, num_cases or 3, seed=seed, size=size,
            variant=dicom_variant, overwrite=overwrite, on_case=report)
        click.echo(f"wrote {len(written)} DICOM series to {out_dir}")
        return
    written = synthetic.write_cases(
        out_dir, num_cases, seed=seed, size=size, labels_from=labels_from,
        preview=preview, overwrite=overwrite, on_case=report, cysts=cysts,
        extra_tumours=extra_tumours)
    click.echo(f"wrote {len(written)} case(s) to {out_dir}")
