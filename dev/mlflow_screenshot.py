"""A PNG of the MLflow UI showing one run (for docs/images/mlflow-run.png), taken with headless Chromium.

    .venv/bin/python dev/mlflow_screenshot.py --tracking-uri http://127.0.0.1:5000 --run-id <id> \\
        --out docs/images/mlflow-run.png [--tab model-metrics|overview|artifacts] [--search REGEX]

Needs Chromium (Debian: ``apt-get install -y chromium``) and a running tracking server holding the run. Not part
of the test suite.

Why not just ``chromium --headless --screenshot``: the MLflow UI is a JavaScript app that fetches the run after
the page loads, and a virtual-time budget has taken the picture before the charts were drawn; MLflow 3.x also
opens its "Assistant" side panel on a browser profile's first visit (a quarter of the picture) and starts in its
GenAI view. So the script drives Chromium through the DevTools protocol over a pipe (``--remote-debugging-pipe``:
standard library only, no port opened): it loads the page, switches the UI to "Model training", closes the
Assistant panel, loads the page again, optionally types ``--search`` into the "Search metric charts" box (a
regular expression there: e.g. only the per-epoch charts, not a run's many ``eval-<split>/...`` sections, which
come first), hides the charts' Plotly toolbars (MLflow shows every chart's at once, over its latest points), waits
until the page has stopped changing, and captures it. Credentials in the URI are refused: a
docs screenshot of a loopback server needs none.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

TABS = {"overview": "", "model-metrics": "/model-metrics", "artifacts": "/artifacts"}

# Clicks by visible text and label, so that a class-name change in MLflow's bundle does not break them; either
# control may be absent in another MLflow version, which is fine (the expression returns false).
_MODEL_TRAINING = """(() => {
  const label = [...document.querySelectorAll('body *')].find(
    e => e.children.length === 0 && e.textContent.trim() === 'Model training');
  if (!label) return false;
  (label.closest('button,label,[role=radio]') || label).click();
  return true;
})()"""
_CLOSE_ASSISTANT = """(() => {
  const title = [...document.querySelectorAll('body *')].find(
    e => e.textContent.trim().startsWith('MLflow Assistant') && e.textContent.length < 40);
  for (let box = title; box; box = box.parentElement) {
    const close = box.querySelector('button[aria-label="Close"]');
    if (close) { close.click(); return true; }
  }
  return false;
})()"""

# Typed into the model-metrics tab's chart filter the way React sees typing (its value setter, then an input event).
_SEARCH_CHARTS = """(() => {
  const box = document.querySelector('input[placeholder="Search metric charts"]');
  if (!box) return false;
  Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(box, %s);
  box.dispatchEvent(new Event('input', {bubbles: true}));
  return true;
})()"""

# Plotly's per-chart toolbar, which MLflow keeps visible on every chart (not only the hovered one).
_HIDE_TOOLBARS = """(() => {
  const style = document.createElement('style');
  style.textContent = '.modebar-container { display: none !important; }';
  document.head.appendChild(style);
  return document.querySelectorAll('.modebar-container').length > 0;
})()"""

# What "the page has stopped changing" is measured on: the amount of markup and the number of drawn charts.
_PAGE_STATE = """JSON.stringify([document.readyState, document.body ? document.body.innerHTML.length : 0,
  document.querySelectorAll('.js-plotly-plot, canvas').length,
  document.body ? document.body.innerText.includes(%s) : false])"""


class DevTools:
    """Chromium's DevTools protocol over ``--remote-debugging-pipe``: JSON messages ending in NUL, commands on the
    browser's fd 3, answers and events on its fd 4."""

    def __init__(self, binary: str, args: list[str]) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def onto_3_and_4() -> None:  # in the child, before exec: either end may itself be fd 3 or 4, so go high first
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w)]
            for target, fd in zip((3, 4), high):
                os.dup2(fd, target)
                os.close(fd)

        # pass_fds keeps 3 and 4 open past the close-all that follows preexec_fn.
        self.process = subprocess.Popen([binary, *args, "--remote-debugging-pipe"], preexec_fn=onto_3_and_4,
                                        pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None

    def call(self, method: str, params: dict | None = None, session: bool = True, timeout: float = 30) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            for reply in self._messages(deadline):
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})

    def _messages(self, deadline: float) -> list[dict]:
        while b"\0" not in self._buffer:
            if not select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium exited")
            self._buffer += chunk
        *complete, self._buffer = self._buffer.split(b"\0")
        return [json.loads(part) for part in complete if part]

    def evaluate(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result.get("result", {}).get("value")

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False, timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


def run_page(tracking_uri: str, run_id: str, tab: str) -> tuple[str, str]:
    """The UI's address of the run page (MLflow 3: ``#/experiments/<experiment id>/runs/<run id>[/<tab>]``) and
    the run's name (what the rendered page must show)."""
    from mlflow.tracking import MlflowClient

    info = MlflowClient(tracking_uri).get_run(run_id).info
    return f"{tracking_uri.rstrip('/')}/#/experiments/{info.experiment_id}/runs/{run_id}{TABS[tab]}", info.run_name


def _load(browser: DevTools, url: str | None, must_show: str, settle_s: float, timeout_s: float) -> None:
    """Navigate to ``url`` (None: stay), then wait until the page shows ``must_show`` and has not changed for
    ``settle_s``."""
    if url is not None:
        browser.call("Page.navigate", {"url": url})
    deadline, last, since = time.monotonic() + timeout_s, None, time.monotonic()
    while time.monotonic() < deadline:
        state = browser.evaluate(_PAGE_STATE % json.dumps(must_show))
        if state != last:
            last, since = state, time.monotonic()
        elif last and json.loads(last)[0] == "complete" and json.loads(last)[3] and time.monotonic() - since > settle_s:
            return
        time.sleep(0.25)
    print(f"warning: {url} still changing after {timeout_s:.0f} s; capturing anyway", file=sys.stderr)


def screenshot(url: str, must_show: str, out: Path, width: int = 1600, height: int = 1000,
               chromium: str | None = None, timeout_s: float = 60, search: str | None = None) -> Path:
    """Render ``url`` in a fresh headless Chromium profile and write the picture to ``out`` (``search``: typed
    into the metric charts' filter first)."""
    binary = chromium or shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary is None:
        raise SystemExit("chromium not found: apt-get install -y chromium (or pass --chromium)")
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dermray-chromium-") as profile:
        browser = DevTools(binary, [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
            f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank",
        ])
        try:
            target = browser.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
            browser.session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                           session=False)["sessionId"]
            browser.call("Page.enable")
            browser.call("Emulation.setDeviceMetricsOverride",
                         {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
            _load(browser, url, must_show, settle_s=1.0, timeout_s=timeout_s)
            tidied = []
            if browser.evaluate(_MODEL_TRAINING):  # it also leaves for the experiment's run list: come back
                tidied.append("model training view")
                _load(browser, "about:blank", "", settle_s=0.2, timeout_s=10)
                _load(browser, url, must_show, settle_s=1.0, timeout_s=timeout_s)
            if browser.evaluate(_CLOSE_ASSISTANT):
                tidied.append("assistant closed")
            if search and browser.evaluate(_SEARCH_CHARTS % json.dumps(search)):
                tidied.append(f"charts filtered by {search!r}")
            if browser.evaluate(_HIDE_TOOLBARS):
                tidied.append("chart toolbars hidden")
            _load(browser, None, must_show, settle_s=2.0, timeout_s=timeout_s)  # let the layout settle
            png = base64.b64decode(browser.call("Page.captureScreenshot", {"format": "png"})["data"])
        finally:
            browser.close()
    out.write_bytes(png)
    size = png_size(out)
    print(f"wrote {out} ({size[0]}x{size[1]}, {len(png)} bytes; ui: {', '.join(tidied) or 'as is'}) "
          f"from {url}", file=sys.stderr)
    return out


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header; raises if the file is not a PNG."""
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise SystemExit(f"{path} is not a PNG")
    return struct.unpack(">II", head[16:24])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True, help="the MLflow server, e.g. http://127.0.0.1:5000")
    parser.add_argument("--run-id", required=True, help="the run to show (e.g. a dermray train run's id)")
    parser.add_argument("--out", type=Path, default=Path("docs/images/mlflow-run.png"))
    parser.add_argument("--tab", choices=sorted(TABS), default="model-metrics",
                        help="the run page's tab (default: model-metrics, the per-epoch curves)")
    parser.add_argument("--search", help="a regular expression for the metric charts' filter (model-metrics tab), "
                        "e.g. '^(train_loss|val_loss|val_balanced_accuracy|lr)$'")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=60, help="seconds the page gets to render")
    parser.add_argument("--chromium", help="the browser binary (default: chromium on PATH)")
    args = parser.parse_args(argv)
    if urllib.parse.urlsplit(args.tracking_uri).password is not None:
        parser.error("put no credentials in --tracking-uri")
    url, run_name = run_page(args.tracking_uri, args.run_id, args.tab)
    screenshot(url, run_name, args.out, args.width, args.height, args.chromium, args.timeout, args.search)
    return 0


if __name__ == "__main__":
    sys.exit(main())
