"""Loading pages in headless Chromium over the DevTools protocol.

:func:`load_pages` starts ``chromium --headless=new --remote-debugging-pipe``
(the protocol's JSON messages, NUL-separated, on file descriptors 3 and 4:
no port, no websocket library), opens each page in a tab and reports what
the browser itself saw: console messages, uncaught exceptions and browser
log entries (failed loads, blocked resources), every URL the page requested,
and for each ``<img>`` whether it decoded (``HTMLImageElement.decode()``,
which rejects for an image the browser cannot decode), its natural size and
the pixels it rendered (block means read back from a canvas). Chromium's
PNG decoder is lenient: an image whose compressed data is damaged
mid-stream still "decodes" with its full natural size, showing garbage or
nothing below the damage, so only the pixels tell it apart.
"""

import json
import os
import select
import shutil
import subprocess
import tempfile
import time


def chromium_binary():
    """Path of the Chromium executable, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


# Grid of blocks whose mean RGBA the page reports per image.
GRID = 16

# Runs in the page after its load event: one entry per <img>, with the mean
# RGBA (0-255) of each block of a GRID x GRID split of the decoded pixels,
# read back from a canvas (row-major blocks, 4 values each).
_IMAGES_JS = """Promise.all(Array.from(document.images, img =>
  img.decode().then(() => {
    const w = img.naturalWidth, h = img.naturalHeight, n = %d;
    const canvas = document.createElement("canvas");
    canvas.width = w; canvas.height = h;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const px = ctx.getImageData(0, 0, w, h).data;
    const sums = new Float64Array(n * n * 4), counts = new Float64Array(n * n);
    for (let y = 0; y < h; y++) {
      const by = Math.floor(y * n / h);
      for (let x = 0; x < w; x++) {
        const b = by * n + Math.floor(x * n / w), i = (y * w + x) * 4;
        counts[b]++;
        for (let c = 0; c < 4; c++) sums[b * 4 + c] += px[i + c];
      }
    }
    return {ok: true, width: w, height: h,
            blocks: Array.from(sums, (v, i) => v / counts[i >> 2])};
  }, err => ({ok: false, error: String(err), width: img.naturalWidth}))))
""" % GRID


class _Pipe:
    """The DevTools protocol over a pair of pipes."""

    def __init__(self, to_browser, from_browser):
        self.to_browser, self.from_browser = to_browser, from_browser
        self.buffer = b""
        self.next_id = 0
        self.events = []

    def send(self, method, params=None, session=None, timeout=30.0):
        self.next_id += 1
        message = {"id": self.next_id, "method": method,
                   "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self.receive(timeout)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def receive(self, timeout):
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.from_browser], [], [],
                                        max(left, 0))
            if not ready:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self.from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def wait_for(self, method, session, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if (event.get("method") == method
                        and event.get("sessionId") == session):
                    return event
            self.events.append(self.receive(deadline - time.monotonic()))


def load_pages(urls, binary=None, timeout=60.0):
    """Loads each URL in its own tab; returns one dict per URL.

    Each dict: ``errors`` (console messages of level error or warning,
    uncaught exceptions and browser log entries, as text), ``requests``
    (every URL the page fetched, itself included) and ``images`` (per
    ``<img>``: ``ok``, ``width``, ``height``, ``blocks`` (mean RGBA of
    each block of a :data:`GRID` x :data:`GRID` split, row-major) and
    ``error`` when it did not decode).
    """
    binary = binary or chromium_binary()
    profile = tempfile.mkdtemp(prefix="kits-keras-chromium-")
    cmd_read, cmd_write = os.pipe()
    out_read, out_write = os.pipe()
    # bash puts the pipe ends on the descriptors Chromium expects (dash's
    # redirections take single-digit descriptors only; under pytest they
    # are often above 9).
    proc = subprocess.Popen(
        ["bash", "-c", f'exec "$0" "$@" 3<&{cmd_read} 4>&{out_write}', binary,
         "--headless=new", "--no-sandbox", "--disable-gpu",
         "--no-first-run", "--remote-debugging-pipe",
         f"--user-data-dir={profile}", "about:blank"],
        pass_fds=(cmd_read, out_write), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    os.close(cmd_read)
    os.close(out_write)
    pipe = _Pipe(cmd_write, out_read)
    try:
        return [_load(pipe, url, timeout) for url in urls]
    finally:
        try:
            pipe.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(cmd_write)
        os.close(out_read)
        shutil.rmtree(profile, ignore_errors=True)


def _load(pipe, url, timeout):
    target = pipe.send("Target.createTarget", {"url": "about:blank"})
    session = pipe.send("Target.attachToTarget", {
        "targetId": target["targetId"], "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        pipe.send(f"{domain}.enable", session=session)
    pipe.events.clear()
    pipe.send("Page.navigate", {"url": url}, session=session)
    pipe.wait_for("Page.loadEventFired", session, timeout)
    images = pipe.send("Runtime.evaluate", {
        "expression": _IMAGES_JS, "awaitPromise": True,
        "returnByValue": True}, session=session, timeout=timeout)
    images = images["result"]["value"]
    # Anything logged late (after the load event) arrives before this reply.
    pipe.send("Runtime.evaluate", {"expression": "1"}, session=session)
    errors, requests = [], []
    for event in pipe.events:
        if event.get("sessionId") != session:
            continue
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params["type"] in (
                "error", "warning", "assert"):
            errors.append("console: " + " ".join(
                str(a.get("value", a.get("description", "")))
                for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            errors.append("exception: "
                          + params["exceptionDetails"].get("text", ""))
        elif method == "Log.entryAdded" and params["entry"]["level"] in (
                "error", "warning"):
            errors.append("log: " + params["entry"]["text"])
        elif method == "Network.requestWillBeSent":
            requests.append(params["request"]["url"])
    pipe.send("Target.closeTarget", {"targetId": target["targetId"]})
    return {"errors": errors, "requests": requests, "images": images}


def block_means(rgba, grid=GRID):
    """Mean RGBA of each block of a ``grid`` x ``grid`` split of an
    ``(h, w, 4)`` uint8 image, as the page computes it (pixel row ``y``
    in block row ``floor(y * grid / h)``); flat, row-major."""
    import numpy as np

    h, w = rgba.shape[:2]
    rows = np.arange(h) * grid // h
    cols = np.arange(w) * grid // w
    sums = np.zeros((grid, grid, 4))
    counts = np.zeros((grid, grid, 1))
    np.add.at(sums, (rows[:, None], cols[None, :]), rgba.astype(np.float64))
    np.add.at(counts, (rows[:, None], cols[None, :]), 1.0)
    return (sums / counts).reshape(-1)
