"""The MLflow UI shows what the pipeline logs: a real browser (Debian's chromium, headless, driven by
Playwright) opens a run's page on a real `mlflow server` and must find the run's metric there.

    .venv/bin/python -m pytest -q tests/test_mlflow_ui.py     # screenshot: tests/artifacts/mlflow_run.png

Chromium comes from apt (`.ci/tools.sh` installs it when running as root); Playwright's own browser download
is never used. Without /usr/bin/chromium the test skips and says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlflow_server import mlflow_server  # noqa: F401  (the pytest fixture)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).parent / "artifacts" / "mlflow_run.png"


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: run .ci/tools.sh as root (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def test_run_page_shows_metric(mlflow_server, browser):  # noqa: F811
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.create_experiment("ui-check")
    run = client.create_run(experiment_id, run_name="eval-ui-check")
    client.log_metric(run.info.run_id, "accuracy", 0.93)
    client.set_terminated(run.info.run_id)

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{mlflow_server.uri}/#/experiments/{experiment_id}/runs/{run.info.run_id}")
    # The run page is a React app that loads its data after the first paint: wait for the value itself.
    page.get_by_text("0.93", exact=True).first.wait_for(timeout=60_000)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert "eval-ui-check" in page.inner_text("body")
    # The metric's own row in the run's metrics table: its name next to its value.
    row = page.get_by_role("row").filter(has_text="accuracy")
    assert row.count() == 1 and "0.93" in row.inner_text()
    page.close()
