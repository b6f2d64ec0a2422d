"""`mlflow ui` in a real browser: Playwright for Python driving Debian's Chromium
(/usr/bin/chromium; `.ci/install-chromium` installs it, nothing is downloaded), against `mlflow
server` on 127.0.0.1 (tests/services.py). Used by tests/test_ui.py and docs/screenshots.py.

MLflow 3.17's pages fetch as they render and poll for ever (the page never goes network-idle):
each helper waits for what it reads to appear instead."""

from __future__ import annotations

import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from services import MlflowServer

CHROMIUM = Path("/usr/bin/chromium")
LINK = re.compile(r"then open (http://127\.0\.0\.1:5000/\S+)")
WAIT_MS = 60_000  # a first page load on 2 busy cores compiles MLflow's whole bundle
CARD = "experiment-view-compare-runs-card"


def chromium_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    if not CHROMIUM.is_file():
        return (
            f"Chromium not installed ({CHROMIUM}): install Debian's `chromium` package "
            "(`make test` does so when run as root)"
        )
    return None


def run_demo(folder: Path, data_dir: Path, preset: str, env: dict[str, str]) -> str:
    """`seqgen demo` into the sqlite store in `folder`, as a user runs it; returns the link it
    prints for the comparison (on port 5000, where its `mlflow ui` command puts the UI)."""
    command = [sys.executable, "-m", "seqgen.cli", "demo", "--preset", preset, "--seeds", "0"]
    command += ["--data_dir", str(data_dir)]
    done = subprocess.run(command, env=env, cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"seqgen demo failed:\n{done.stderr[-3000:]}")
    links = LINK.findall(done.stderr)
    if not links:
        raise RuntimeError(f"seqgen demo printed no link:\n{done.stderr[-3000:]}")
    return links[-1]


@contextmanager
def ui(store_uri: str, folder: Path, width: int = 1600, height: int = 1000):
    """A page of Chromium on `mlflow server` over the store; yields (page, server's address)."""
    from playwright.sync_api import sync_playwright

    server = MlflowServer(store_uri, folder / "served-artifacts").start()
    try:
        with sync_playwright() as p:
            # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(WAIT_MS)
            try:
                yield page, server.uri
            finally:
                browser.close()
    finally:
        server.stop()


def on_port(link: str, address: str) -> str:
    """The printed link (port 5000) on the server the test started."""
    return link.replace("http://127.0.0.1:5000", address, 1)


def open_runs(page, url: str, run_names: list[str]) -> None:
    """Open a runs page and wait until its table lists `run_names`."""
    page.goto(url)
    for name in run_names:
        page.get_by_role("link", name=name, exact=True).first.wait_for()


def chart(page, metric: str):
    """The chart card of one metric in the runs page's chart view, scrolled into sight and drawn."""
    card = page.get_by_test_id(CARD).filter(has=page.get_by_text(metric, exact=True)).first
    card.scroll_into_view_if_needed()
    card.locator(".js-plotly-plot").wait_for()
    return card


def drawn_lines(card) -> dict[str, list]:
    """What a line chart draws, read from its Plotly figure: {line's name: its x values}."""
    card.locator(".scatterlayer .trace").first.wait_for()
    plot = card.locator(".js-plotly-plot").first
    traces = plot.evaluate("el => el.data.map(d => [String(d.name), Array.from(d.x || [])])")
    return {name: x for name, x in traces}


def close_assistant(page) -> None:
    """The MLflow Assistant panel opens beside a first page; a screenshot wants the room."""
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    try:
        close.wait_for(timeout=5000)
    except Exception:  # Playwright's TimeoutError: this page has no assistant open
        return
    close.click()
