"""HTML review pages: content, escaping, ``infer --report``, a real browser."""

import base64
import io as pyio
import json
import os
import re
import shutil

import numpy as np
import pytest
from tests.browser import block_means
from tests.browser import chromium_binary
from tests.browser import load_pages
from click.testing import CliRunner
from tests.conftest import save_cropped_ct
from tests.conftest import save_untrained_tiny_run
from PIL import Image

from kits_keras import io
from kits_keras import report
from kits_keras.io import label_volumes_ml
from kits_keras.segmenter import Result

_IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" '
                  r'width="(\d+)" height="(\d+)"')
QC_FLAGGED = {"mirroring_disagreement": 0.214, "threshold": 0.05,
              "flagged": True, "tta": "flip",
              "removed_outside_body_ml": {"kidney": 1.5, "tumour": 0.0}}


@pytest.fixture(scope="module")
def case(synthetic_cases_dir):
    """Synthetic case 0: two kidneys, a tumour in the left one."""
    return io.load_case(os.path.join(synthetic_cases_dir, "case_00000"))


def _result(case, labels=None, qc=QC_FLAGGED):
    labels = case.labels.array if labels is None else labels
    return Result(labels, label_volumes_ml(labels, case.spacing), qc,
                  case.image, model="runs/20260101-000000-tiny")


def _images(page):
    """``[(decoded RGBA array, width attr, height attr)]`` of a page; PIL
    checks every chunk's CRC and the zlib stream, so a damaged image
    raises."""
    found = []
    for data, width, height in _IMG.findall(page):
        with Image.open(pyio.BytesIO(base64.b64decode(data))) as img:
            img.load()
            found.append((np.asarray(img.convert("RGBA")), int(width),
                          int(height)))
    return found


def _row(page, name):
    """The numbers of the volumes-table row named ``name``."""
    cells = re.search(rf"<tr><td>{re.escape(name)}</td>(.*?)</tr>", page)
    return [float(v) for v in re.findall(r"<td class=num>([\d.]+)</td>",
                                         cells.group(1))]


def test_page_holds_views_volumes_and_qc(case, tmp_path):
    result = _result(case)
    path = report.write_case_report(str(tmp_path / "c.html"), result,
                                    case_id="case_00000")
    page = open(path, encoding="utf-8").read()
    assert os.listdir(tmp_path) == ["c.html"]  # no temporary left
    # Self-contained: nothing fetched, no script.
    assert not re.search(r"(src|href)=\"(?!data:)", page)
    assert "<script" not in page
    # Both kidneys and the largest tumour, each a decodable PNG whose size
    # matches the attributes.
    images = _images(page)
    assert len(images) == 3
    for pixels, width, height in images:
        assert pixels.shape[:2] == (height, width)
        assert pixels[..., :3].std() > 10  # a picture, not a blank
    for title in ("Right kidney", "Left kidney", "Largest tumour"):
        assert f"<h2>{title}</h2>" in page
    # The table's totals are the result's volumes; per kidney sums to them.
    vols = result.volumes_ml
    assert _row(page, "All") == [round(vols[k], 1) for k in (
        "kidney_ml", "tumour_ml", "kidney_and_tumour_ml")]
    right, left = _row(page, "Right kidney"), _row(page, "Left kidney")
    assert right[0] + left[0] == pytest.approx(vols["kidney_ml"], abs=0.1)
    assert right[1] + left[1] == pytest.approx(vols["tumour_ml"], abs=0.1)
    assert left[1] > 0 and right[1] == 0  # the generator's tumour side
    # QC flag and its reasons.
    assert 'class="qc REVIEW">QC: REVIEW' in page
    assert "Mirroring disagreement 0.214 is above the threshold 0.05" in page
    assert "1.5 mL of kidney predicted outside the body" in page
    assert "runs/20260101-000000-tiny" in page
    assert case.image.path in page


def test_kits23_page_and_index_show_cysts(case, tmp_path):
    labels = case.labels.array.copy()
    kidney = np.argwhere(labels == 1)
    z, y, x = kidney[len(kidney) // 2]
    labels[z - 1:z + 2, y - 2:y + 3, x - 2:x + 3] = 3   # a cyst in a kidney
    vols = label_volumes_ml(labels, case.spacing, num_classes=4)
    result = Result(labels, vols, QC_FLAGGED, case.image)
    page = open(report.write_case_report(str(tmp_path / "c.html"), result,
                                         case_id="c"), encoding="utf-8").read()
    assert "<th>Cyst mL</th>" in page and "cyan: cyst" in page
    assert _row(page, "All") == [round(vols[k], 1) for k in (
        "kidney_ml", "tumour_ml", "cyst_ml", "kidney_and_masses_ml")]
    rows = [_row(page, "Right kidney"), _row(page, "Left kidney")]
    assert sum(r[2] for r in rows) == pytest.approx(vols["cyst_ml"], abs=0.1)
    assert vols["cyst_ml"] > 0
    summary = {"cases": [{"case_id": "c", "volumes": vols,
                          "qc": QC_FLAGGED, "outputs": {}}], "failures": []}
    index = open(report.write_index(str(tmp_path / "index.html"), summary),
                 encoding="utf-8").read()
    assert "<th>Cyst mL</th>" in index
    assert f"<td class=num>{vols['cyst_ml']:.1f}</td>" in index
    # A KiTS19 page has no cyst column.
    plain = open(report.write_case_report(str(tmp_path / "p.html"),
                                          _result(case), case_id="p"),
                 encoding="utf-8").read()
    assert "Cyst" not in plain and "cyst" not in plain


def test_sides_follow_the_affine(case):
    """The same array with the left-right axis stored the other way round
    names the kidneys the other way round."""
    labels = case.labels.array
    flipped = io.Volume(case.image.array, case.spacing,
                        case.image.affine @ np.diag([1.0, 1.0, -1.0, 1.0]))
    sides = [k["side"] for k in report.kidney_components(labels,
                                                         case.image)[0]]
    other = [k["side"] for k in report.kidney_components(labels,
                                                         flipped)[0]]
    assert sorted(sides) == ["left", "right"]
    assert other == [{"left": "right", "right": "left"}[s] for s in sides]


def test_text_is_escaped(case, tmp_path):
    name = "<script>x"
    result = _result(case, qc={"mirroring_disagreement": None,
                               "threshold": 0.05, "flagged": False})
    page = open(report.write_case_report(
        str(tmp_path / "p.html"), result, case_id=name,
        input_path="/in/<b>ct</b>.nii.gz"), encoding="utf-8").read()
    assert "<h1>&lt;script&gt;x</h1>" in page
    assert "<title>kits-keras report: &lt;script&gt;x</title>" in page
    assert "/in/&lt;b&gt;ct&lt;/b&gt;.nii.gz" in page
    assert "<script" not in page and "<b>ct" not in page
    assert "QC: NOT CHECKED" in page
    summary = {"cases": [{"case_id": name, "volumes": result.volumes_ml,
                          "qc": result.qc,
                          "outputs": {"report_html": str(tmp_path /
                                                         "a b#1.html")}}],
               "failures": [{"case_id": "bad<i>", "input": "/x/bad.nii",
                             "error": "/x/bad.nii: <not> a NIfTI"}]}
    index = open(report.write_index(str(tmp_path / "index.html"), summary),
                 encoding="utf-8").read()
    assert '<a href="a%20b%231.html">&lt;script&gt;x</a>' in index
    assert "bad&lt;i&gt;" in index and "&lt;not&gt; a NIfTI" in index
    assert "<script" not in index and "<i>" not in index


def test_no_kidney_page(case, tmp_path):
    result = _result(case, labels=np.zeros_like(case.labels.array))
    page = open(result.save_report(str(tmp_path / "e.html")),
                encoding="utf-8").read()
    assert "No kidney found." in page
    assert _images(page) == []
    assert _row(page, "All") == [0.0, 0.0, 0.0]
    assert "<h1>imaging</h1>" in page  # case id from the input's name


# --- kits-keras infer --report ---------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return save_untrained_tiny_run(tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture(scope="module")
def small_ct(synthetic_cases_dir, tmp_path_factory):
    """Synthetic case 0 cropped to a few network tiles (speed)."""
    return save_cropped_ct(synthetic_cases_dir, "case_00000",
                           tmp_path_factory.mktemp("ct"))


def _infer(args):
    from cli.infer import infer

    return CliRunner().invoke(infer, args, catch_exceptions=False)


def test_infer_report_writes_page_and_index(small_ct, run_dir, tmp_path):
    out = tmp_path / "out"
    result = _infer([small_ct, "-o", str(out), "--model", run_dir, "--tta",
                     "none", "--report"])
    assert result.exit_code == 0, result.output
    assert f"Review page: {out / 'index.html'}" in result.output
    summary = json.loads((out / "summary.json").read_text())
    (case,) = summary["cases"]
    assert case["outputs"]["report_html"] == str(out / "ct.html")
    page = (out / "ct.html").read_text(encoding="utf-8")
    assert "<h1>ct</h1>" in page and run_dir in page
    assert "QC: NOT CHECKED" in page  # --tta none: no disagreement score
    assert _row(page, "All") == [round(case["volumes"][k], 1) for k in (
        "kidney_ml", "tumour_ml", "kidney_and_tumour_ml")]
    index = (out / "index.html").read_text(encoding="utf-8")
    assert '<a href="ct.html">ct</a>' in index
    assert sorted(os.listdir(out)) == ["ct.html", "ct.json", "ct.nii.gz",
                                       "index.html", "summary.json"]
    # A case named "index" would write the batch index: refused up front.
    shutil.copy(small_ct, tmp_path / "index.nii.gz")
    other = tmp_path / "other"
    result = _infer([str(tmp_path / "index.nii.gz"), small_ct, "-o",
                     str(other), "--model", run_dir, "--report"])
    assert result.exit_code == 1
    assert "the batch index and" in result.output
    assert not other.exists()


@pytest.mark.large
def test_infer_report_batch_failures_and_overwrite(small_ct, run_dir,
                                                   tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "<b>"):
        shutil.copy(small_ct, inputs / f"{name}.nii.gz")
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b not a nifti")
    out = tmp_path / "out"
    args = [str(inputs), "-o", str(out), "--model", run_dir, "--tta",
            "none", "--report"]
    result = _infer(args)
    assert result.exit_code == 1  # broken.nii.gz failed, the others not
    summary = json.loads((out / "summary.json").read_text())
    for case in summary["cases"]:
        assert case["outputs"]["report_html"] == str(
            out / f"{case['case_id']}.html")
    index = (out / "index.html").read_text(encoding="utf-8")
    assert '<a href="a.html">a</a>' in index
    assert '<a href="%3Cb%3E.html">&lt;b&gt;</a>' in index
    assert "broken" in index and "Failed" in index
    # The pages are outputs: an existing index stops a second run, one
    # case's existing page fails that case, --overwrite replaces them.
    before = (out / "a.html").stat().st_mtime_ns
    os.remove(out / "summary.json")
    result = _infer(args)
    assert result.exit_code == 1
    assert "index.html: exists; pass --overwrite" in result.output
    for name in ("index.html", "a.nii.gz", "a.json"):
        os.remove(out / name)
    result = _infer(args)
    assert result.exit_code == 1
    assert "a.html: exists; pass --overwrite" in result.output
    assert (out / "a.html").stat().st_mtime_ns == before
    result = _infer(args + ["--overwrite"])
    assert (out / "a.html").stat().st_mtime_ns != before
    assert (out / "index.html").is_file()
    # Without -o: the page beside the segmentation, no index.
    ct = tmp_path / "ct.nii.gz"
    shutil.copy(small_ct, ct)
    result = _infer([str(ct), "--model", run_dir, "--tta", "none",
                     "--report"])
    assert result.exit_code == 0, result.output
    assert f"Review page: {tmp_path / 'ct_seg.html'}" in result.output
    assert not (tmp_path / "index.html").exists()


# --- A real browser -------------------------------------------------------


def _browser_problems(loaded, expected):
    """What is wrong with one page as Chromium loaded it: console or log
    errors, any request that is not the page or a data: URI, an image that
    did not decode, or whose rendered pixels differ from ``expected`` (the
    PNG files the page should show, in order, decoded strictly)."""
    problems = list(loaded["errors"])
    problems += [f"fetched {url[:60]}" for url in loaded["requests"][1:]
                 if not url.startswith("data:")]
    if len(loaded["images"]) != len(expected):
        problems.append(f"{len(loaded['images'])} images rendered, "
                        f"{len(expected)} expected")
    for i, (shown, png) in enumerate(zip(loaded["images"], expected)):
        if not shown["ok"]:
            problems.append(f"image {i}: {shown['error']}")
            continue
        with Image.open(pyio.BytesIO(png)) as img:
            want = block_means(np.asarray(img.convert("RGBA")))
        diff = np.abs(np.asarray(shown["blocks"]) - want).max()
        if diff > 2.0:
            problems.append(f"image {i}: rendered pixels differ by {diff}")
    return problems


def test_pages_render_in_headless_chromium(case, tmp_path):
    """Loads a case page and a batch index in headless Chromium
    (``--remote-debugging-pipe``, see ``tests/browser.py``) and checks what
    the browser saw: no console message, uncaught exception or browser log
    entry of level warning or error; no request but the page itself and its
    data: URIs; every ``<img>`` decoded by the browser
    (``HTMLImageElement.decode()``) and rendering the same pixels as a
    strict decode of its bytes (16 x 16 block means read back from a
    canvas; Chromium's lenient decoder shows an image damaged mid-stream at
    full size, so the size alone proves nothing).

    The check must be able to fail: a copy of the page with one base64
    image damaged in the middle of its compressed data (Chromium shows it
    at full size, garbage below the damage) and another one's PNG
    signature damaged (Chromium refuses it) is loaded too, compared with
    the pixels the page should show, and both must be caught.
    """
    binary = chromium_binary()
    if binary is None:
        pytest.skip("Chromium not installed (Debian: apt-get install "
                    "chromium)")
    page_path = report.write_case_report(str(tmp_path / "case.html"),
                                         _result(case), case_id="<x>")
    page = open(page_path, encoding="utf-8").read()
    summary = {"cases": [{"case_id": "<x>", "volumes": _result(case)
                          .volumes_ml, "qc": QC_FLAGGED,
                          "outputs": {"report_html": page_path}}],
               "failures": []}
    index_path = report.write_index(str(tmp_path / "index.html"), summary)
    pngs = [base64.b64decode(data) for data, _, _ in _IMG.findall(page)]
    assert len(pngs) == 3 and len(_images(page)) == 3  # strictly valid
    data = [d for d, _, _ in _IMG.findall(page)]
    at = len(data[0]) // 2
    broken = page.replace(data[0], data[0][:at] + "AAAAAAAA"
                          + data[0][at + 8:])
    broken = broken.replace(data[1], data[1][:4] + "AAAA" + data[1][8:])
    broken_path = tmp_path / "broken.html"
    broken_path.write_text(broken, encoding="utf-8")
    loaded = load_pages([f"file://{page_path}", f"file://{index_path}",
                         f"file://{broken_path}"], binary)
    assert _browser_problems(loaded[0], pngs) == []
    assert _browser_problems(loaded[1], []) == []
    problems = _browser_problems(loaded[2], pngs)
    assert problems[0].startswith("image 0: rendered pixels differ")
    assert problems[1] == ("image 1: EncodingError: The source image "
                           "cannot be decoded.")
    assert len(problems) == 2, problems
