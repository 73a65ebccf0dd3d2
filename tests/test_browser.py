"""The workbook in a real JupyterLab, driven by headless Chromium through playwright (``make test-browser``).

JupyterLab (this environment's) serves copies of chapters in smoke mode (parameters injected by
papermill's own ``parameterize_notebook``; artifacts shared with ``make smoke``'s folder so the tiny
model is reused); Chromium (Debian's ``chromium`` package, never playwright's download) opens each,
runs all cells through JupyterLab's own ``notebook:run-all-cells`` command, and the test checks what
a reader sees: no cell with an error, every figure decoded and drawn, the widgets rendered (in the
chapters that use ipywidgets), and the
interactive parts answering: a slider of chapter 01's NVFP4 block explorer redraws its figure, the
context slider of chapter 05's calculator changes its totals.

Every chapter by default; ``NEXLAB_BROWSER_CHAPTERS=01_nvfp4_numerics,05_kv_cache_sizing`` opens only
those. Deselected unless pytest runs with ``--browser``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from nexlab.llamacpp.process import free_port, terminate
from nexlab.workbook import runner as workbook

pytestmark = pytest.mark.browser

NOTEBOOKS = {p.stem: p for p in workbook.list_notebooks()}
#: every chapter by default; NEXLAB_BROWSER_CHAPTERS="01_nvfp4_numerics,05_kv_cache_sizing" picks some
_PICK = [c.strip() for c in os.environ.get("NEXLAB_BROWSER_CHAPTERS", "all").split(",") if c.strip()]
CHAPTERS = list(NOTEBOOKS) if _PICK in ([], ["all"]) else _PICK
RUN_TIMEOUT_S = 900


def uses_widgets(stem: str) -> bool:
    """Whether a chapter displays ipywidgets (then the widget manager must render them)."""
    nb = json.loads(NOTEBOOKS[stem].read_text(encoding="utf-8"))
    return any("ipywidgets" in "".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def chromium_path() -> str:
    """Debian's Chromium (or $CHROMIUM); the test fails, not skips, without it: it is what it tests with."""
    for cand in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if cand and (p := shutil.which(cand)):
            return p
    pytest.fail("no Chromium: `make test-browser` installs Debian's chromium package as root "
                "(apt-get install chromium), or set CHROMIUM=/path/to/chromium")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on 127.0.0.1 serving smoke-mode copies of :data:`CHAPTERS`; yields (url, token, root)."""
    import nbformat  # noqa: PLC0415
    from papermill.iorw import load_notebook_node  # noqa: PLC0415
    from papermill.parameterize import parameterize_notebook  # noqa: PLC0415

    root = tmp_path_factory.mktemp("lab")
    paths = workbook.WorkbookPaths(tmp_path_factory.mktemp("outputs"))
    shared = workbook.WorkbookPaths.default(smoke=True)
    for stem in CHAPTERS:
        nb = load_notebook_node(str(NOTEBOOKS[stem]))
        params = workbook.notebook_parameters(NOTEBOOKS[stem], paths, smoke=True, seed=0, extra={})
        params["ARTIFACTS_DIR"] = str(shared.artifacts)
        nbformat.write(parameterize_notebook(nb, params), str(root / f"{stem}.ipynb"))
    port, token = free_port(), secrets.token_hex(16)
    log = open(root / "lab.log", "wb")
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", "--allow-root",
           "--LabApp.expose_app_in_browser=True", "--ServerApp.open_browser=False"]
    env = dict(os.environ, NEXLAB_NO_PROGRESS="1")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (root / "lab.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "JupyterLab did not start:\n" + (root / "lab.log").read_text()[-3000:]
            time.sleep(0.5)
        yield url, token, root
    finally:
        terminate(proc, grace=20)
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), headless=True,
                              args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


# the notebook panel's model and session, read through JupyterLab's own objects (window.jupyterapp)
_STATE_JS = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const cells = Array.from(w.content.model.cells);
  const code = cells.filter(c => c.type === 'code');
  const outs = code.map(c => c.outputs.toJSON());
  return {
    kernel: w.sessionContext.session && w.sessionContext.session.kernel ? \
w.sessionContext.session.kernel.status : 'none',
    busy: w.content.widgets.filter(c => c.model.type === 'code' && c.promptNode && \
c.promptNode.textContent.includes('*')).length,
    unrun: code.filter(c => c.executionCount === null && c.sharedModel.getSource().trim() !== '').length,
    errors: outs.flat().filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue),
    pngs: outs.flat().filter(o => o.data && o.data['image/png']).length,
  };
}"""


def _open_and_run(page, url: str, token: str, stem: str) -> dict:
    # a workspace of its own (?reset): JupyterLab does not reopen the previous chapter beside this one
    page.goto(f"{url}/lab/workspaces/{stem}/tree/{stem}.ipynb?reset&token={token}")
    page.wait_for_function("(p) => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget; "
                           "return w && w.context && w.context.path === p && w.content && w.sessionContext.session && "
                           "w.sessionContext.session.kernel && w.sessionContext.session.kernel.status === 'idle'; }",
                           arg=f"{stem}.ipynb", timeout=120_000)
    # the command's promise settles when the last cell has run (or one failed: run-all stops there)
    page.evaluate("() => { window.__nexlabRun = 'running'; window.jupyterapp.commands.execute('notebook:run-all-cells')"
                  ".then(() => { window.__nexlabRun = 'done'; }, e => { window.__nexlabRun = 'failed: ' + e; }); }")
    try:
        page.wait_for_function("() => window.__nexlabRun !== 'running' && window.jupyterapp.shell.currentWidget"
                               ".sessionContext.session.kernel.status === 'idle'", timeout=RUN_TIMEOUT_S * 1000,
                               polling=1000)
    except Exception as exc:  # playwright's TimeoutError
        raise AssertionError(f"{stem}: cells still running after {RUN_TIMEOUT_S} s: "
                             f"{page.evaluate(_STATE_JS)}") from exc
    s = page.evaluate(_STATE_JS)
    assert page.evaluate("() => window.__nexlabRun") == "done" or s["errors"], page.evaluate("() => window.__nexlabRun")
    assert s["errors"] or (s["busy"] == 0 and s["unrun"] == 0), f"{stem}: not every cell ran: {s}"
    return s


def _check_rendered(page, stem: str, state: dict) -> None:
    assert not state["errors"], f"{stem}: cells raised: {state['errors']}"
    # every PNG output drawn: an <img> decoded to a real size (a broken image has naturalWidth 0)
    page.wait_for_timeout(500)
    imgs = page.evaluate("""() => Array.from(document.querySelectorAll(
        '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output img')).map(i => [i.complete, \
i.naturalWidth, i.naturalHeight])""")
    assert state["pngs"] > 0, f"{stem}: no figure in the outputs"
    assert len(imgs) >= state["pngs"], f"{stem}: {state['pngs']} figures in the outputs, {len(imgs)} drawn"
    assert all(c and w > 0 and h > 0 for c, w, h in imgs), f"{stem}: figures not decoded: {imgs}"
    errs = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").count()
    assert errs == 0, f"{stem}: {errs} error outputs shown"
    # widgets were rendered by the widget manager, not left as "Loading widget..." text
    if uses_widgets(stem):
        assert page.locator(".jupyter-widgets").count() > 0, f"{stem}: no widget rendered"
    assert page.get_by_text("Error displaying widget").count() == 0, f"{stem}: a widget failed to display"


def _slider(page, label: str):
    s = page.locator(".widget-slider", has=page.locator(".widget-label", has_text=label)).first
    s.scroll_into_view_if_needed()
    return s


def _interact_01(page) -> None:
    """Moving x0 of the NVFP4 block explorer redraws its figure (a new PNG)."""
    fig = page.locator(".widget-output img").first
    fig.scroll_into_view_if_needed()
    before = fig.get_attribute("src")
    handle = _slider(page, "x0").locator(".noUi-handle").first
    handle.focus()
    for _ in range(200):  # 0.2 of the value range: the block's codes change
        handle.press("ArrowRight")
    page.wait_for_function("(b) => { const i = document.querySelector('.widget-output img'); "
                           "return i && i.getAttribute('src') !== b && i.naturalWidth > 0; }", arg=before,
                           timeout=60_000)


def _interact_05(page) -> None:
    """Changing the context of the memory calculator changes its totals."""
    box = page.locator(".widget-interact").first
    box.scroll_into_view_if_needed()
    out = box.locator(".widget-output")
    page.wait_for_function("() => { const o = document.querySelector('.widget-interact .widget-output'); "
                           "return o && o.innerText.includes('total'); }", timeout=60_000)
    before = out.inner_text()
    readout = _slider(page, "context").locator(".widget-readout")
    readout.click()
    readout.press("Control+a")
    readout.type("8192")
    readout.press("Enter")
    page.wait_for_function("(b) => { const o = document.querySelector('.widget-interact .widget-output'); "
                           "return o && o.innerText.includes('total') && o.innerText !== b; }", arg=before,
                           timeout=60_000)
    after = out.inner_text()

    def line(text, key):
        return next(ln for ln in text.splitlines() if ln.startswith(key))

    assert line(after, "KV") != line(before, "KV") and line(after, "total") != line(before, "total"), (before, after)
    assert line(after, "weights") == line(before, "weights")


INTERACT = {"01_nvfp4_numerics": _interact_01, "05_kv_cache_sizing": _interact_05}


@pytest.mark.parametrize("stem", CHAPTERS)
def test_chapter_runs_renders_and_answers_in_jupyterlab(stem, lab, browser):
    url, token, root = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    console_errors: list[str] = []
    page.on("pageerror", lambda e: console_errors.append(str(e)))
    try:
        state = _open_and_run(page, url, token, stem)
        _check_rendered(page, stem, state)
        if stem in INTERACT:
            INTERACT[stem](page)
        assert not console_errors, f"{stem}: JavaScript errors: {console_errors[:3]}"
    except BaseException:
        page.screenshot(path=str(root / f"{stem}-failure.png"), full_page=False)
        print(f"screenshot: {root / f'{stem}-failure.png'}; "
              f"executed state: {json.dumps(page.evaluate(_STATE_JS))[:2000]}")
        raise
    finally:
        page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
        page.close()
