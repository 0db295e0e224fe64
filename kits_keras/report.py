"""Per-case HTML review pages and a batch index.

A page (:func:`write_case_report`) is one self-contained file: the PNG
views are inlined as base64 ``data:`` URIs, the CSS is inline, and there is
no script and no external resource, so it opens from a file share, an
e-mail attachment or a browser without network access. It shows:

* the case id, input path, model and date;
* the quality-control status (``REVIEW`` with the reasons when the result's
  ``qc["flagged"]``);
* the volumes table: the result's totals, then per kidney (each of the two
  largest connected components of kidney + tumour, with its side);
* for each kidney and for the largest tumour component, axial, coronal and
  sagittal planes through its centre (:func:`kits_keras.viz.central_voxel`)
  with the labels outlined over the CT (window 40/400 HU), pixel aspect
  following the voxel spacing (:func:`kits_keras.viz.orthogonal_views_png`).

A case with no kidney and no tumour still gets a page, saying so.

Sides come from the array's voxel-to-world matrix
(:attr:`kits_keras.io.Volume.array_affine`, RAS+ world: +x is the patient's
right): a component is on the patient's right when its centroid lies right
of the body's centroid (voxels above -500 HU), so one kidney alone is named
as well as a pair.

Every text shown (case ids and paths come from user file names, errors from
exceptions) goes through :func:`html.escape`; links are percent-encoded.

Example (the labels of an untrained model mean nothing):

>>> import numpy as np, tempfile
>>> from kits_keras import io
>>> from kits_keras.segmenter import Result
>>> ct = np.full((8, 32, 32), 40.0, np.float32)          # (z, y, x) HU
>>> labels = np.zeros(ct.shape, np.uint8); labels[3:6, 10:20, 4:12] = 1
>>> affine = np.array([[0, 0, -1.0, 0], [0, -1, 0, 0], [-3, 0, 0, 0],
...                    [0, 0, 0, 1]])           # axes I, P, L (KiTS19's)
>>> volume = io.Volume(ct, (3.0, 1.0, 1.0), affine)
>>> result = Result(labels, {"kidney_ml": 0.72, "tumour_ml": 0.0,
...                          "kidney_and_tumour_ml": 0.72},
...                 {"mirroring_disagreement": None, "flagged": False},
...                 volume)
>>> path = write_case_report(tempfile.mkdtemp() + "/c.html", result,
...                          case_id="c")
>>> "Right kidney" in open(path).read()
True
"""

import base64
import datetime
import html
import os
import struct
import urllib.parse

import numpy as np
from scipy import ndimage

from kits_keras import files
from kits_keras import io
from kits_keras import viz

INDEX_FILE = "index.html"
# Two kidneys at most; smaller components are counted, not drawn.
MAX_KIDNEYS = 2
BODY_HU = -500.0

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#111;
max-width:1400px}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.2em 0 .3em}
table{border-collapse:collapse;margin:.4em 0}
td,th{border:1px solid #bbb;padding:.25em .6em;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.meta td:first-child{color:#555}
.qc{display:inline-block;padding:.3em .8em;font-weight:bold;
border-radius:4px;font-size:1.2em}
.REVIEW,.FAILED{background:#c62828;color:#fff}.OK{background:#2e7d32;
color:#fff}.NOT-CHECKED{background:#f9a825;color:#000}
.notice{border-left:6px solid #c62828;padding:.5em 1em;background:#fdecea}
img{max-width:100%;height:auto;display:block;background:#000}
figure{margin:.3em 0 1em}figcaption{color:#555;font-size:.9em}
"""


def write_case_report(path, result, case_id=None, input_path=None,
                      model=None, created=None):
    """Writes one case's self-contained HTML page (atomically).

    Args:
        path: str. Destination ``.html``.
        result: :class:`kits_keras.segmenter.Result` (labels, volumes,
            qc, the CT as read).
        case_id: str. Shown as the title. Defaults to the input's file
            name.
        input_path: str. Defaults to ``result.volume.path``.
        model: str. The model file or run. Defaults to ``result.model``.
        created: :class:`datetime.datetime`. Defaults to now (UTC).

    Returns:
        str: ``path``.
    """
    page = case_page(result, case_id, input_path, model, created)
    return _write_text(path, page)


def case_page(result, case_id=None, input_path=None, model=None,
              created=None):
    """The HTML text of :func:`write_case_report`."""
    volume = result.volume
    input_path = input_path if input_path is not None else volume.path
    case_id = case_id or (io.nifti_stem(input_path) if input_path
                          else "case")
    model = model if model is not None else getattr(result, "model", "")
    labels = np.asarray(result.labels)
    kidneys, others_ml = kidney_components(labels, volume)
    status, reasons = qc_status(result.qc)
    parts = [
        f"<h1>{_e(case_id)}</h1>",
        _meta_table([("Input", input_path or "(array in memory)"),
                     ("Model", model or "(unknown)"),
                     ("Created", _date(created)),
                     ("Grid", _grid(volume))]),
        f'<p><span class="qc {status.replace(" ", "-")}">QC: '
        f"{_e(status)}</span></p>",
        "<ul>" + "".join(f"<li>{_e(r)}</li>" for r in reasons) + "</ul>",
    ]
    if not labels.any():
        parts.append('<p class="notice"><b>No kidney found.</b> The model '
                     "labelled no kidney and no tumour in this CT.</p>")
    parts.append("<h2>Volumes</h2>")
    parts.append(_volumes_table(result.volumes_ml, kidneys, others_ml))
    for kidney in kidneys:
        parts.append(_figure(kidney["name"], volume, labels,
                             viz.central_voxel(kidney["mask"]),
                             f"{kidney['name']}: kidney "
                             f"{kidney['kidney_ml']:.1f} mL, tumour "
                             f"{kidney['tumour_ml']:.1f} mL"))
    tumour = viz.largest_component(labels == 2)
    if tumour is not None:
        ml = float(np.count_nonzero(tumour)) * volume.voxel_volume_ml
        parts.append(_figure("Largest tumour", volume, labels,
                             viz.central_voxel(tumour),
                             f"largest tumour component {ml:.1f} mL"))
    return _document(f"kits-keras report: {case_id}", parts)


def qc_status(qc):
    """``(status, reasons)`` of a result's ``qc`` dict.

    Status is ``"REVIEW"`` when ``qc["flagged"]``, ``"NOT CHECKED"`` when
    there is no mirroring-disagreement score (``tta="none"``), else
    ``"OK"``; reasons are sentences for the reader.
    """
    score = qc.get("mirroring_disagreement")
    threshold = qc.get("threshold")
    reasons = []
    if qc.get("flagged"):
        status = "REVIEW"
        if score is not None:
            reasons.append(f"Mirroring disagreement {score:.3f} is above "
                           f"the threshold {threshold}: the mirrored "
                           "predictions disagree on this case.")
    elif score is None:
        status = "NOT CHECKED"
        reasons.append("No mirroring-disagreement score (run without "
                       "mirroring, tta none).")
    else:
        status = "OK"
        reasons.append(f"Mirroring disagreement {score:.3f} (threshold "
                       f"{threshold}).")
    removed = qc.get("removed_outside_body_ml") or {}
    for name, ml in removed.items():
        if ml:
            reasons.append(f"{ml:.1f} mL of {name} predicted outside the "
                           "body was set to background.")
    return status, reasons


def kidney_components(labels, volume):
    """The kidneys of a label map, largest first, with their side.

    A kidney is a 26-connected component of kidney + tumour (labels > 0),
    as :mod:`kits_keras.inference.postprocess` counts them; the
    :data:`MAX_KIDNEYS` largest are kept.

    Returns:
        ``(kidneys, others_ml)``: list of dicts (``name``, ``side``,
        ``mask``, ``kidney_ml``, ``tumour_ml``) and the mL of the smaller
        components not listed.
    """
    comps, n = ndimage.label(labels > 0, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return [], 0.0
    sizes = ndimage.sum_labels(labels > 0, comps, range(1, n + 1))
    order = np.argsort(-sizes, kind="stable")
    voxel_ml = volume.voxel_volume_ml
    midline = _body_midline_x(volume)
    kidneys = []
    for index in order[:MAX_KIDNEYS]:
        mask = comps == index + 1
        centre = ndimage.center_of_mass(mask)
        side = "right" if _world_x(volume, centre) > midline else "left"
        kidneys.append({
            "side": side, "mask": mask,
            "kidney_ml": float(np.count_nonzero(mask & (labels == 1))
                               * voxel_ml),
            "tumour_ml": float(np.count_nonzero(mask & (labels == 2))
                               * voxel_ml),
            "cyst_ml": float(np.count_nonzero(mask & (labels == 3))
                             * voxel_ml),
        })
    for kidney in kidneys:
        same = [k for k in kidneys if k["side"] == kidney["side"]]
        name = f"{kidney['side'].capitalize()} kidney"
        if len(same) > 1:  # two pieces on one side: number them
            name += f" ({same.index(kidney) + 1})"
        kidney["name"] = name
    others_ml = float(sizes[order[MAX_KIDNEYS:]].sum() * voxel_ml)
    return kidneys, others_ml


def _world_x(volume, voxel):
    """RAS+ world x (mm, + = patient's right) of an array voxel."""
    affine = volume.array_affine
    return float(affine[0, :3] @ np.asarray(voxel, np.float64)
                 + affine[0, 3])


def _body_midline_x(volume, step=4):
    """World x of the centroid of the body (voxels above -500 HU), from
    every ``step``-th voxel; the volume centre when nothing is that dense
    (a label map or an empty array)."""
    sample = volume.array[::step, ::step, ::step] > BODY_HU
    if not sample.any():
        centre = [(n - 1) / 2.0 for n in volume.array.shape]
    else:
        centre = np.argwhere(sample).mean(axis=0) * step
    return _world_x(volume, centre)


def write_index(path, summary, created=None):
    """Writes the batch page: one row per case (link, volumes, QC) and the
    failures.

    Args:
        path: str. Destination, usually ``<output folder>/index.html``.
        summary: dict of :func:`kits_keras.inference.batch.run_inference`; a
            case's page is its ``outputs["report_html"]``.
        created: :class:`datetime.datetime`. Defaults to now (UTC).

    Returns:
        str: ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    cysts = any("cyst_ml" in c["volumes"] for c in summary["cases"])
    rows = []
    for case in summary["cases"]:
        vols = case["volumes"]
        status, _ = qc_status(case["qc"])
        page = case["outputs"].get("report_html")
        name = _e(case["case_id"])
        if page:
            href = urllib.parse.quote(os.path.relpath(
                os.path.abspath(page), folder))
            name = f'<a href="{_e(href)}">{name}</a>'
        rows.append(
            f"<tr><td>{name}</td><td class=num>{vols['kidney_ml']:.1f}</td>"
            f"<td class=num>{vols['tumour_ml']:.1f}</td>"
            + (f"<td class=num>{vols.get('cyst_ml', 0.0):.1f}</td>"
               if cysts else "")
            + f'<td><span class="qc {status.replace(" ", "-")}">'
            f"{_e(status)}</span></td></tr>")
    parts = [
        "<h1>kits-keras batch report</h1>",
        _meta_table([("Created", _date(created)),
                     ("Cases", str(len(summary["cases"]))),
                     ("Failed", str(len(summary["failures"])))]),
        "<h2>Cases</h2>",
        "<table><tr><th>Case</th><th>Kidney mL</th><th>Tumour mL</th>"
        + ("<th>Cyst mL</th>" if cysts else "") + "<th>QC</th></tr>" + "".join(rows) + "</table>",
    ]
    if summary["failures"]:
        parts.append("<h2>Failed</h2><table><tr><th>Case</th><th>Input</th>"
                     "<th>Error</th></tr>" + "".join(
                         f"<tr><td>{_e(f['case_id'])}</td>"
                         f"<td>{_e(f.get('input') or '')}</td>"
                         f"<td>{_e(f['error'])}</td></tr>"
                         for f in summary["failures"]) + "</table>")
    return _write_text(path, _document("kits-keras batch report", parts))


def _figure(title, volume, labels, center, caption):
    png = viz.orthogonal_views_png(
        volume.array, volume.spacing,
        overlays=[(labels, viz.label_colours(labels), "prediction")],
        center=center, title=title)
    width, height = png_size(png)
    data = base64.b64encode(png).decode("ascii")
    z, y, x = center
    return (f"<h2>{_e(title)}</h2><figure><img src=\"data:image/png;base64,"
            f"{data}\" width=\"{width}\" height=\"{height}\" alt=\""
            f"{_e(title)}: axial, coronal and sagittal planes\">"
            f"<figcaption>{_e(caption)}; planes through voxel (z, y, x) = "
            f"({z}, {y}, {x}). Yellow: kidney, red: tumour"
            f"{', cyan: cyst' if (labels == 3).any() else ''}. Axial: "
            "radiological view (patient's right on the left).</figcaption>"
            "</figure>")


def png_size(png):
    """``(width, height)`` in pixels from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", png[16:24])


def _volumes_table(volumes_ml, kidneys, others_ml):
    # A KiTS23 model's volumes have a cyst column; KiTS19's table is as it
    # was.
    cysts = "cyst_ml" in volumes_ml
    keys = ("kidney_ml", "tumour_ml", "cyst_ml")[:3 if cysts else 2]

    def row(name, values):
        return (f"<tr><td>{_e(name)}</td>" + "".join(
            f"<td class=num>{v:.1f}</td>" for v in values) + "</tr>")

    rows = [row("All", [volumes_ml[k] for k in keys] + [
        volumes_ml["kidney_and_masses_ml" if cysts
                   else "kidney_and_tumour_ml"]])]
    for k in kidneys:
        values = [k[key] for key in keys]
        rows.append(row(k["name"], values + [sum(values)]))
    head = ("<th>Kidney mL</th><th>Tumour mL</th><th>Cyst mL</th>"
            "<th>Kidney + tumour + cyst mL</th>" if cysts else
            "<th>Kidney mL</th><th>Tumour mL</th><th>Kidney + tumour mL</th>")
    text = ("<table><tr><th></th>" + head + "</tr>" + "".join(rows)
            + "</table>")
    if others_ml:
        text += (f"<p>Smaller separate pieces, counted in All only: "
                 f"{others_ml:.1f} mL.</p>")
    return text


def _meta_table(items):
    return '<table class="meta">' + "".join(
        f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in items
    ) + "</table>"


def _grid(volume):
    shape = " x ".join(str(n) for n in volume.array.shape)
    spacing = " x ".join(f"{s:.2f}" for s in volume.spacing)
    return f"{shape} voxels (z, y, x), {spacing} mm"


def _date(created):
    created = created or datetime.datetime.now(datetime.timezone.utc)
    return created.isoformat(timespec="seconds")


def _document(title, parts):
    from kits_keras import __version__

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(parts)
            + f"\n<p><small>kits-keras {_e(__version__)}. Research software, "
            "not a medical device.</small></p>\n</body></html>\n")


def _e(text):
    return html.escape(str(text), quote=True)


def _write_text(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return files.atomic_write(path, write)
