"""Notebook 01 in a real JupyterLab in headless Chromium: run it (smoke profile), move the angle slider, and check
that the drawn frame changes and that no cell shows an error. A screenshot is kept in ``runs/browser/``.

Needs Playwright (PyPI) and a Chromium (Debian's ``chromium``; ``.ci/run`` installs both). Without them the test is
skipped with the reason, except where ``GEVIT_REQUIRE_BROWSER=1`` (CI), where a missing browser fails it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = "01_why_equivariance.ipynb"
REQUIRED = os.environ.get("GEVIT_REQUIRE_BROWSER") == "1"


def _missing(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"GEVIT_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def _chromium() -> str:
    for name in (os.environ.get("GEVIT_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name) if name else None
        if path:
            return path
    _missing("no Chromium found (apt-get install chromium, or set GEVIT_CHROMIUM)")
    raise AssertionError  # unreachable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _smoke_copy(folder: Path) -> Path:
    """The notebook with its parameters cell set to the smoke profile, in a scratch folder (JupyterLab autosaves)."""
    import nbformat

    nb = nbformat.read(REPO / "notebooks" / NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    data_dir = os.environ.get("GEVIT_DATA_DIR")
    cell.source += (f"\nprofile = 'smoke'\nout_dir = {str(folder / 'figures')!r}\nrun_dir = {str(folder / 'run')!r}"
                    f"\ninteractive = True\n" + (f"data_dir = {data_dir!r}\n" if data_dir else ""))
    if os.environ.get("GEVIT_BROWSER_BREAK_CALLBACK") == "1":  # prove the test fails when the slider does nothing
        for c in nb.cells:
            c.source = c.source.replace("turned = rotate(image, angle,", "turned = rotate(image, 45,").replace(
                "render_frame(turned, angle,", "render_frame(turned, 45,")
    path = folder / NOTEBOOK
    nbformat.write(nb, path)
    return path


@pytest.fixture()
def lab(tmp_path: Path):
    """A JupyterLab server on a free local port serving a scratch folder; yields (base URL, token, folder)."""
    pytest.importorskip("jupyterlab")
    port, token = _free_port(), "gevit-browser-test"
    log = (tmp_path / "lab.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.token={token}", f"--ServerApp.root_dir={tmp_path}", "--ServerApp.disable_check_xsrf=True", "--allow-root"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "JUPYTER_PLATFORM_DIRS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"JupyterLab did not start:\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
                time.sleep(1)
        yield url, token, tmp_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _frame(page) -> str:
    """The ``src`` of the last image drawn in the slider's output area ('' if none yet)."""
    return page.evaluate("""() => {
        const imgs = [...document.querySelectorAll('.jp-OutputArea-output img')];
        return imgs.length ? imgs[imgs.length - 1].src : '';
    }""")


def test_notebook_01_slider_redraws_in_jupyterlab(lab) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    chromium = _chromium()
    url, token, folder = lab
    _smoke_copy(folder)
    shots = REPO / "runs" / "browser"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{url}/lab/tree/{NOTEBOOK}?token={token}", timeout=120_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            try:  # JupyterLab may ask which kernel to start: the notebook's own (Python 3) is preselected
                page.click(".jp-Dialog .jp-mod-accept", timeout=20_000)
            except sync_api.TimeoutError:
                pass
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            page.click(".lm-MenuBar-itemLabel:text-is('Run')", timeout=30_000)
            page.click(".lm-Menu-itemLabel:text-is('Run All Cells')", timeout=30_000)
            slider = page.wait_for_selector(".widget-slider .noUi-handle, .widget-hslider .noUi-handle",
                                            timeout=600_000)
            page.wait_for_function("() => document.querySelectorAll('.jp-OutputArea-output img').length > 0",
                                   timeout=120_000)
            before = _frame(page)
            slider.click()
            for _ in range(40):  # 40 degrees further
                page.keyboard.press("ArrowRight")
            page.wait_for_function(f"(b) => {{ const i = [...document.querySelectorAll('.jp-OutputArea-output img')];"
                                   f" return i.length && i[i.length - 1].src !== b; }}", arg=before, timeout=60_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            after = _frame(page)
            page.screenshot(path=str(shots / "notebook01_slider.png"), full_page=True)
            errors = page.evaluate("() => [...document.querySelectorAll("
                                   "'[data-mime-type=\"application/vnd.jupyter.error\"]')].map(e => e.innerText)")
        except Exception:
            page.screenshot(path=str(shots / "notebook01_failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert before and after and after != before, "moving the slider did not redraw the frame"
    assert not errors, f"cells show errors: {json.dumps(errors)[:2000]}"
