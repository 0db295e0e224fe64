"""``kits-keras infer``: segment CT volumes with a trained model."""

import sys

import click

from cli.common import UserError
from cli.common import backend_option
from cli.common import user_errors


class _Progress:
    """One progress line per case on stderr: tiles done / total."""

    def __init__(self):
        self.case = None

    def __call__(self, case_id, done, total):
        if not sys.stderr.isatty() and done != total:
            return
        width = 30
        filled = int(width * done / max(total, 1))
        end = "\n" if done == total else ""
        click.echo(f"\r{case_id} [{'#' * filled}{'.' * (width - filled)}] "
                   f"{done}/{total} tiles", nl=False, err=True)
        if end:
            click.echo("", err=True)


@click.command("infer")
@click.argument("inputs", nargs=-1, required=True,
                type=click.Path(path_type=str))
@click.option("-o", "--output", type=click.Path(path_type=str),
              help="Output .nii.gz (one input) or folder (<case_id>.nii.gz "
              "+ .json per case, summary.json). Default: <name>_seg.nii.gz "
              "beside each input.")
@click.option("--model", type=click.Path(exists=True, path_type=str),
              multiple=True,
              help="Run folder, .keras file or `kits-keras export` "
              "folder (as --saved-model). Default: the latest "
              "finished run under $KITS_KERAS_RUNS or ./runs (not one "
              "still training or interrupted). Repeat it to predict with "
              "an ensemble: the models' probabilities are averaged per "
              "tile (as nnU-Net averages its folds); they must share "
              "patch size, spacing, intensity statistics, orientation and "
              "labels, and the first one's inference settings are used.")
@click.option("--saved-model", type=click.Path(exists=True, file_okay=False,
                                               path_type=str),
              help="Run a `kits-keras export` folder (model base path or "
              "version folder) instead of --model, to check an export "
              "before deploying it (TensorFlow runs it on the CPU). A "
              "SavedModel is code: use only exports from a trusted source. "
              "One whose graph holds file-system or other I/O ops "
              "(ReadFile, WriteFile, PyFunc, ...) is refused before "
              "loading.")
@click.option("--overlap", type=click.FloatRange(0, 1, max_open=True),
              help="Tile overlap as a share of the patch (default: the "
              "model's config, 0.5).")
@click.option("--tta", type=click.Choice(["all", "flip", "none"]),
              help="Mirroring: all 8 axis combinations, in-plane flips (4) "
              "or none (default: the model's config); only along the axes "
              "the model was trained mirrored.")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Tiles per network call.")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default=None,
              help="Run the network on the CPU or the GPU (default: GPU if "
              "there is one).")
@backend_option()
@click.option("--save-probabilities", is_flag=True,
              help="Also write <name>_probabilities.npz (float16, network "
              "resolution; 'channels' names the classes, or the regions "
              "of a region model).")
@click.option("--no-postprocess", is_flag=True,
              help="Skip the connected-component clean-up.")
@click.option("--preview", is_flag=True,
              help="Also write <name>.png: axial, coronal, sagittal views "
              "with the prediction outlined.")
@click.option("--report", is_flag=True,
              help="Also write <name>.html beside each segmentation: one "
              "self-contained page (open it in any browser; no viewer, "
              "no network) with the QC flag, the volumes per kidney and "
              "axial, coronal and sagittal views through each kidney and "
              "the largest tumour, outlined on the CT. With a folder -o, "
              "also -o/index.html: one row per case with its link, "
              "volumes and QC flag, and the failed inputs.")
@click.option("--output-type", default="nifti", show_default=True,
              type=click.Choice(["nifti", "dicom-seg", "both"]),
              help="For DICOM inputs: a NIfTI on the series' grid (as "
              "dcm2niix converts it), a DICOM SEG (<name>.dcm) referencing "
              "the series (segments Kidney and Renal mass, SNOMED CT "
              "coded), or both. A NIfTI input takes only nifti.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@user_errors
def infer(inputs, output, model, saved_model, overlap, tta, batch_size,
          device, backend, save_probabilities, no_postprocess, preview,
          report, output_type, overwrite):
    """Segment kidneys and kidney tumours in CT volumes.

    INPUTS: NIfTI files, KiTS19 case folders (imaging.nii.gz inside),
    folders of either, or folders of DICOM CT series (searched recursively;
    each series is a case, outputs beside its folder by default; needs
    pip install 'kits-keras[dicom]'). A series that cannot be one volume
    (non-CT, localizer, mixed, gantry tilt, missing slices, irregular
    spacing) fails with one line naming the file. Writes a uint8 segmentation (0 background, 1 kidney,
    2 tumour) on each input's grid, and a JSON with kidney and tumour
    volumes (mL), timings and a quality-control flag. Exits with 1 if any
    input failed (the others are still segmented).

    Nothing is overwritten without --overwrite: an input whose outputs
    (segmentation, .json, and with the options _probabilities.npz, .png,
    .html) exist fails, and an existing summary.json (or with --report,
    index.html) stops the run. Two inputs
    that would write the same file (x.nii.gz from two folders into one -o,
    y.nii beside y.nii.gz), or an output that would replace an input, stop
    the run before any work. Hidden files (a dot first) in input folders
    are ignored.
    """
    if model and saved_model:
        raise UserError("--model and --saved-model exclude each other")
    _select_device(device, backend)
    from kits_keras.inference.batch import run_inference
    from kits_keras.inference.jobs import InferOptions

    summary = run_inference(
        list(inputs), output=output, model=list(model) or None,
        saved_model=saved_model,
        infer_overrides={"overlap": overlap, "tta": tta,
                         "batch_size": batch_size},
        options=InferOptions(postprocess=not no_postprocess,
                             save_probabilities=save_probabilities,
                             preview=preview, report=report,
                             overwrite=overwrite,
                             output_type=output_type),
        progress=_Progress(),
    )
    _echo_summary(summary, output, report)
    if summary["failures"]:
        done = len(summary["cases"])
        raise UserError(f"{len(summary['failures'])} of "
                        f"{done + len(summary['failures'])} inputs failed")


def _select_device(device, backend):
    """Hides the GPUs for ``--device cpu`` (before Keras and JAX are
    imported), refuses ``--device gpu`` without one, selects the backend."""
    from kits_keras.backend import has_accelerator
    from kits_keras.backend import hide_accelerators
    from kits_keras.backend import select_backend

    if device == "cpu":  # before Keras (and JAX) are imported
        hide_accelerators()

    if device == "gpu" and not has_accelerator():
        raise UserError("--device gpu: no GPU visible to JAX on this host")
    select_backend(backend)


def _echo_summary(summary, output, report):
    """One line per segmented case and review page on stdout, one per
    failure on stderr."""
    for case in summary["cases"]:
        vols, qc = case["volumes"], case["qc"]
        flag = "  REVIEW (mirroring disagreement)" if qc["flagged"] else ""
        score = qc["mirroring_disagreement"]
        cyst = (f"cyst {vols['cyst_ml']:.1f} mL, " if "cyst_ml" in vols
                else "")  # KiTS23 models
        click.echo(
            f"{case['case_id']}: {case['outputs']['segmentation']}  kidney "
            f"{vols['kidney_ml']:.1f} mL, tumour {vols['tumour_ml']:.1f} mL, "
            f"{cyst}disagreement {'n/a' if score is None else f'{score:.3f}'}, "
            f"{case['timings_s']['total']:.1f} s{flag}"
        )
    if report and summary["cases"]:
        from kits_keras.inference.jobs import InferOptions
        from kits_keras.inference.jobs import index_path

        index = index_path(output, InferOptions(report=True))
        pages = [index] if index else [
            case["outputs"]["report_html"] for case in summary["cases"]]
        for page in pages:
            click.echo(f"Review page: {page}")
    for failure in summary["failures"]:
        click.echo(f"FAILED {failure['case_id']}: {failure['error']}",
                   err=True)
